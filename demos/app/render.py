"""How the demo page shows a request: each round's draft tokens as accepted (green), rejected (red, struck
through) or produced by the VLM itself (blue), and the stats panel."""

from __future__ import annotations

import html

from mmspec.types import Round, Stats


# Inline styles too, so the token view reads right even where the page CSS is missing (e.g. copied HTML).
STYLE = {
    "accepted": "background:#d3f5d3;color:#0b5d0b;",
    "rejected": "background:#fbd5d5;color:#9b1c1c;text-decoration:line-through;",
    "target": "background:#d6e4ff;color:#1a3f8f;",
}
TITLE = {"accepted": "accepted draft token", "rejected": "rejected draft token (discarded)",
         "target": "token the VLM produced itself (correction or bonus)"}
SPAN_BASE = "border-radius:3px;padding:0 1px;margin:0 1px 0 0;"
BRANCH_STYLE = "font-size:80%;opacity:.8;border:1px dashed #9b1c1c;border-radius:4px;padding:0 2px;margin:0 2px;"

CSS = """
#tokens .tok-view { white-space: pre-wrap; line-height: 1.9; font-family: ui-monospace, monospace; font-size: 15px; }
#tokens .round-sep { display: inline-block; width: 1px; height: 1.1em; background: #999; margin: 0 3px;
                     vertical-align: middle; opacity: .5; }
.tok-accepted { background:#d3f5d3; color:#0b5d0b; }
.tok-rejected { background:#fbd5d5; color:#9b1c1c; text-decoration: line-through; }
.tok-target { background:#d6e4ff; color:#1a3f8f; }
#error-box:empty { display: none; }
"""

LEGEND = (
    '<div class="tok-legend" style="margin-bottom:6px">'
    + " ".join(f'<span class="tok-{k}" style="{SPAN_BASE}{STYLE[k]}">{html.escape(TITLE[k])}</span>'
               for k in ("accepted", "rejected", "target"))
    + ' <span style="opacity:.7">&nbsp;| marks a round (one VLM forward)</span></div>'
)



class TokenRenderer:
    """Turns rounds into HTML spans. Each token's text is its increment to the decoded output, so the accepted
    and VLM spans concatenate to exactly the final text; special tokens (end of sequence) show their name."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []       # emitted so far
        self.text = ""                 # decode(self.ids)
        self.rounds_html: list[str] = []
        self.table: list[list] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _raw_piece(self, tid: int) -> str:
        try:
            piece = self.tok.convert_ids_to_tokens(int(tid))
        except Exception:  # an id outside the tokenizer (padded vocabulary rows)
            piece = None
        return str(piece) if piece is not None else f"<id {tid}>"

    def piece(self, prefix_ids: list[int], prefix_text: str, tid: int) -> tuple[str, str]:
        """(text the token adds after ``prefix_ids``, text of the whole sequence)."""
        full = self._decode(prefix_ids + [tid])
        if full.startswith(prefix_text):
            added = full[len(prefix_text):]
            if added:
                return added, full
        # special token (decodes to nothing) or a decoder that is not prefix-stable: show the raw piece
        return self._raw_piece(tid).replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n"), full

    @staticmethod
    def span(kind: str, text: str, tid: int, rnd: int) -> str:
        return (f'<span class="tok tok-{kind}" data-id="{int(tid)}" data-round="{rnd}" '
                f'title="round {rnd}: {html.escape(TITLE[kind])} (id {int(tid)})" '
                f'style="{SPAN_BASE}{STYLE[kind]}">{html.escape(text)}</span>')

    def add_round(self, rnd: Round) -> None:
        n = len(self.rounds_html) + 1
        drafts = [int(t) for t in rnd.draft_ids]
        spans, draft_pieces = [], []
        for tid in drafts[:rnd.n_accepted]:
            added, self.text = self.piece(self.ids, self.text, tid)
            self.ids.append(tid)
            spans.append(self.span("accepted", added, tid, n))
            draft_pieces.append(added)
        # rejected drafts: shown where they were rejected, i.e. right before the VLM's correction; a tree's
        # rejected branches are set apart in brackets (each token read after the accepted path)
        rej_ids, rej_text = list(self.ids), self.text
        branch = []
        for tid in drafts[rnd.n_accepted:]:
            if rnd.parents is not None:
                added, _ = self.piece(self.ids, self.text, tid)
            else:
                added, rej_text = self.piece(rej_ids, rej_text, tid)
                rej_ids.append(tid)
            branch.append(self.span("rejected", added, tid, n))
            draft_pieces.append(added)
        if rnd.parents is not None and branch:
            spans.append(f'<span class="tok-branches" title="round {n}: rejected branches of the draft tree" '
                         f'style="{BRANCH_STYLE}">[{" ".join(branch)}]</span>')
        else:
            spans.extend(branch)
        vlm = ""
        if rnd.target_token is not None:
            tid = int(rnd.target_token)
            added, self.text = self.piece(self.ids, self.text, tid)
            self.ids.append(tid)
            spans.append(self.span("target", added, tid, n))
            vlm = added
        self.rounds_html.append("".join(spans))
        self.table.append([n, " | ".join(repr(p)[1:-1] for p in draft_pieces) if draft_pieces else "(none)",
                           f"{rnd.n_accepted}/{len(drafts)}", repr(vlm)[1:-1] if rnd.target_token is not None
                           else "(stopped inside the drafts)"])

    def html(self) -> str:
        sep = ('<span class="round-sep" style="display:inline-block;width:1px;height:1.1em;background:#999;'
               'margin:0 3px;vertical-align:middle;opacity:.5"></span>')
        return (LEGEND + '<div class="tok-view" style="white-space:pre-wrap;line-height:1.9">'
                + sep.join(self.rounds_html) + "</div>")



def _card(name: str, value: str, wide: bool = False) -> str:
    return (f"<div class='stat' style='border:1px solid #ccc;border-radius:6px;padding:4px 10px;"
            f"min-width:{'260px' if wide else '110px'}'><div class='stat-value' style='font-size:1.25em;"
            f"font-weight:600'>{html.escape(value)}</div><div class='stat-name' style='font-size:.85em;"
            f"opacity:.75'>{html.escape(name)}</div></div>")


def stats_html(stats: Stats, wall_s: float, kind: str, done: bool, compare: dict | None = None,
               note: str = "") -> str:
    """The stats panel; ``wall_s`` is the request's time in the engine so far (from its submission to its latest
    round, sharing each round with the other requests in the batch; page updates excluded)."""
    tps = stats.new_tokens / wall_s if wall_s > 0 else 0.0
    cards = [
        _card("status", "done" if done else "generating…"),
        _card("drafter", kind),
        _card("tokens/s", f"{tps:.1f}"),
        _card("mean accepted tokens per VLM forward", f"{stats.mean_accepted:.2f}", wide=True),
        _card("acceptance rate", f"{stats.acceptance_rate:.0%} ({stats.accepted_tokens}/{stats.drafted_tokens})"),
        _card("vision cache hit", "yes" if stats.vision_cache_hit else "no"),
        _card("new tokens / VLM forwards", f"{stats.new_tokens} / {stats.target_forwards}", wide=True),
        _card("time", f"{wall_s:.2f} s"),
    ]
    if done and stats.stop_reason:
        cards.append(_card("stopped by", stats.stop_reason))
    if compare:
        cards += [
            _card("speedup on this request", f"{compare['speedup']:.2f}×"),
            _card("plain decoding (drafter none)", f"{compare['wall_s']:.2f} s, {compare['tokens_per_s']:.1f} tok/s, "
                                                   f"{compare['forwards']} fwd", wide=True),
            _card("same text as plain decoding", compare["same"]),
        ]
    out = ("<div class='mmspec-stats' style='display:flex;flex-wrap:wrap;gap:6px'>" + "".join(cards) + "</div>")
    if note:
        out += f"<p style='opacity:.75;margin-top:4px'>{html.escape(note)}</p>"
    return out


def error_html(message: str) -> str:
    return (f"<div role='alert' style='border:1px solid #d33;background:#fdecec;color:#8a1010;padding:8px;"
            f"border-radius:6px'><b>Cannot run this request:</b> {html.escape(message)}</div>")


def conversation_html(messages: list[dict]) -> str:
    """The conversation so far: one line per turn, its images as numbered markers (in the order the model gets
    them), its text escaped."""
    if not messages:
        return ""
    lines, n = [], 0
    for m in messages:
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        bits = []
        for p in parts:
            if p.get("type") == "image":
                n += 1
                bits.append(f"<span class='conv-image'>[image {n}]</span>")
            else:
                bits.append(html.escape(p.get("text", "")))
        who = "You" if m["role"] == "user" else "VLM" if m["role"] == "assistant" else m["role"]
        lines.append(f"<div class='conv-turn conv-{html.escape(m['role'])}'><b>{who}:</b> {' '.join(bits)}</div>")
    return "<div class='conversation'>" + "".join(lines) + "</div>"
