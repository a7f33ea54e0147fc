"""The web demo: answer a question about an image and watch, round by round, which draft tokens the VLM
accepted (green), which it rejected (red, struck through) and which it produced itself (blue).

    mmspec demo                              # bundled default pair, http://127.0.0.1:7860
    mmspec demo --host 0.0.0.0 --port 8080   # listen on every interface
    python -m demos.app --target llava-hf/llava-1.5-7b-hf --drafter double7/vicuna-68m --device cuda

``build_app(pipe)`` builds the ``gr.Blocks`` around any ``Pipeline``; ``launch(app, ...)`` starts it with the
upload limit, concurrency limit and CSS. The generation handler is ``app.mmspec_backend.generate``: a
generator yielding a tuple of output values as rounds finish, so tests can call it without a browser.

Concurrent users share the batched engine: each request is ``pipe.submit``-ted to the shared engine of its
drafter kind's pipeline, so up to ``Pipeline.default_batch_size`` requests decode together in every target
forward; a request whose page is closed (or cancelled) leaves the batch at the next round.
"""

from __future__ import annotations

import argparse
import html
import logging
import queue
import sys
import threading
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator

from mmspec.config import MAX_DRAFT_TOKENS, MAX_TREE_NODES
from mmspec.errors import MMSpecError
from mmspec.types import Round, Stats, StreamEvent

log = logging.getLogger("mmspec.demo")

SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"  # mmspec.pipeline.ASSETS
DEFAULT_PROMPT = "Describe the image."
BUNDLED_NOTE = ("\n\n*The bundled models know only this repository's synthetic world of 1-4 coloured shapes on a "
                "3x3 grid (like the samples below): they describe such scenes and answer questions like \"What color "
                "is the circle?\", \"How many objects are there?\", \"Where is the red square?\", \"Is there a "
                "blue star?\"; on a photo, or asked anything else, their answer is meaningless.*")
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_CONCURRENCY = 16  # requests run at once, together in one batch per drafter kind (= Pipeline.default_batch_size)
ROUND_TIMEOUT_S = 600.0   # a request whose next round takes longer than this is given up
MAX_NEW_TOKENS_LIMIT = 512

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


# --------------------------------------------------------------------------------------------------------------
# token rendering
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# backend: pipelines per drafter kind and the generation handler
# --------------------------------------------------------------------------------------------------------------
class DemoBackend:
    """Holds the loaded pipeline and, sharing its target adapter (weights, vision cache), one extra pipeline per
    weightless drafter kind. ``generate`` is the handler the Generate button calls."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.pipelines: dict[str, Pipeline] = {pipe.drafter_kind: pipe}
        self._lock = threading.Lock()

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys([self.pipe.drafter_kind, "ngram", "none"]))

    def pipeline(self, kind: str) -> Pipeline:
        if kind not in self.kinds:
            raise MMSpecError(f"unknown drafter kind {kind!r}; this model pair offers {self.kinds}")
        with self._lock:
            if kind not in self.pipelines:
                from mmspec.drafters import NgramDrafter, NoDrafter
                from mmspec.pipeline import Pipeline

                cls = {"ngram": NgramDrafter, "none": NoDrafter}[kind]
                self.pipelines[kind] = Pipeline(self.pipe.adapter, cls(self.pipe.adapter))
            return self.pipelines[kind]

    @staticmethod
    def _settings(num_draft_tokens, temperature, max_new_tokens, seed, tree_nodes=0) -> dict:
        def as_int(value, name):
            try:
                f = float(value)
            except (TypeError, ValueError):
                raise MMSpecError(f"{name} must be a number, got {value!r}") from None
            if f != f or f in (float("inf"), float("-inf")) or f != int(f):
                raise MMSpecError(f"{name} must be a whole number, got {value!r}")
            return int(f)

        k = as_int(num_draft_tokens if num_draft_tokens is not None else 0, "number of draft tokens")
        try:
            temp = float(temperature if temperature is not None else 0.0)
        except (TypeError, ValueError):
            raise MMSpecError(f"temperature must be a number, got {temperature!r}") from None
        n = as_int(max_new_tokens, "max new tokens")
        if n > MAX_NEW_TOKENS_LIMIT:
            raise MMSpecError(f"max new tokens is limited to {MAX_NEW_TOKENS_LIMIT} in the demo, got {n}")
        s = None if seed in (None, "") else as_int(seed, "seed")
        t = as_int(tree_nodes if tree_nodes is not None else 0, "tree nodes")
        return dict(num_draft_tokens=None if k == 0 else k, temperature=temp, max_new_tokens=n, seed=s,
                    tree_nodes=None if t == 0 else t)

    @staticmethod
    def _image(image):
        if image is None:
            raise MMSpecError("no image: upload one or click a sample image below")
        if isinstance(image, dict):  # a FileData-like payload
            image = image.get("path") or image.get("url")
        return image

    def generate(self, image, prompt, drafter_kind, num_draft_tokens=0, temperature=0.0, max_new_tokens=64,
                 compare=False, seed=0, tree_nodes=0) -> Iterator[tuple[str, list, str, str, str]]:
        """Yields (tokens_html, rounds_table, stats_html, final_text, error_html) after every round.
        ``tree_nodes`` > 0 drafts a tree per round (0 = a chain)."""
        try:
            yield from self._generate(image, prompt, drafter_kind, num_draft_tokens, temperature, max_new_tokens,
                                      compare, seed, tree_nodes)
        except MMSpecError as e:
            yield "", [], "", "", error_html(str(e))
        except Exception as e:  # never a stack trace in the page; the log keeps it
            log.exception("demo request failed")
            yield "", [], "", "", error_html(f"internal error ({type(e).__name__}: {e}); see the server log")

    def _generate(self, image, prompt, drafter_kind, num_draft_tokens, temperature, max_new_tokens, compare, seed,
                  tree_nodes=0):
        settings = self._settings(num_draft_tokens, temperature, max_new_tokens, seed, tree_nodes)
        if settings["temperature"] == 0:
            settings["seed"] = None
        pipe = self.pipeline(drafter_kind or self.pipe.drafter_kind)
        image = self._image(image)
        renderer = TokenRenderer(pipe.processor.tokenizer if hasattr(pipe.processor, "tokenizer")
                                 else pipe.processor)
        event = None
        with closing(self._events(pipe, image, prompt, settings)) as events:  # closed with this handler: row freed
            for event, more_waiting in events:
                renderer.add_round(event.round)
                if event.done:
                    break
                if more_waiting:  # the page fell behind the engine: one update for all the rounds that came
                    continue
                yield (renderer.html(), renderer.table, stats_html(event.stats, event.stats.wall_s,
                                                                   pipe.drafter_kind, False), event.text, "")
        result = event.result
        cmp = None
        note = ""
        if compare:
            yield (renderer.html(), renderer.table,
                   stats_html(result.stats, result.stats.wall_s, pipe.drafter_kind, False,
                              note="running plain decoding (drafter none) on the same request for comparison…"),
                   result.text, "")
            base = None
            plain = dict(settings, tree_nodes=None)
            with closing(self._events(self.pipeline("none"), image, prompt, plain)) as events:
                for base, _ in events:
                    pass
            base = base.result
            plain_s, spec_s = base.stats.wall_s, result.stats.wall_s
            if settings["temperature"] == 0:
                same = "yes" if base.token_ids == result.token_ids else "NO (please report this)"
            else:
                same = "not expected with sampling (same distribution, different draws)"
            cmp = dict(wall_s=plain_s, tokens_per_s=base.stats.new_tokens / plain_s if plain_s > 0 else 0.0,
                       forwards=base.stats.target_forwards, speedup=plain_s / spec_s if spec_s > 0 else 0.0,
                       same=same)
            note = ("Plain decoding ran second and reused the cached image features, so the speedup shown is, "
                    "if anything, an underestimate. " if not result.stats.vision_cache_hit else "")
            note += ("Both times are measured in the shared engine: other users' requests in the same batch "
                     "slow both.")
        yield (renderer.html(), renderer.table, stats_html(result.stats, result.stats.wall_s, pipe.drafter_kind, True,
                                                           cmp, note), result.text, "")

    @staticmethod
    def _events(pipe: Pipeline, image, prompt: str, settings: dict) -> Iterator[tuple[StreamEvent, bool]]:
        """(event, more_waiting) per round of the request on ``pipe``'s shared batched engine, where it runs in one
        batch with the other users' requests (``pipe.submit``; bad input raises ``MMSpecError`` at once);
        ``more_waiting``: further rounds are already there. If the caller stops early (the page was closed, the
        request cancelled: Gradio closes the handler's generator), the row is freed at the next round."""
        from mmspec.engine import iter_job_events

        job = pipe.submit(image, prompt, **settings)
        try:
            for event in iter_job_events(job, timeout=ROUND_TIMEOUT_S):
                if event.done and event.result is not None and event.result.error is not None:
                    raise MMSpecError(event.result.error)
                yield event, not job.events.empty()
        except queue.Empty:
            raise MMSpecError(f"the model produced nothing for {ROUND_TIMEOUT_S:.0f} s; try again later") from None
        finally:
            if not job.done:
                job.cancelled = True


# --------------------------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------------------------
def raw_image_input(**kwargs) -> gr.Image:
    """A ``gr.Image`` that hands the handler the uploaded file's path without opening it, so mmspec's own image
    validation turns a bad file into a readable message instead of Gradio failing before the handler runs.
    (An instance override rather than a subclass: Gradio writes a ``.pyi`` stub next to any module that
    subclasses a component.)"""
    import gradio as gr

    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    original = image.preprocess

    def preprocess(payload):
        if payload is not None and getattr(payload, "path", None) and not str(
                getattr(payload, "url", None) or "").startswith("data:"):
            return str(payload.path)
        return original(payload)

    image.preprocess = preprocess
    return image


def sample_examples(folder: Path = SAMPLE_IMAGES, limit: int = 16) -> list[list]:
    """``[[image_path], ...]`` for the bundled sample images (empty when there are none)."""
    if not folder.is_dir():
        return []
    return [[str(p)] for p in sorted(folder.glob("*.png"))[:limit]]


def build_app(pipe_or_factory: Pipeline | Callable[[], Pipeline], examples: list[list] | None = None,
              title: str = "mmspec: speculative decoding for VLMs", default_prompt: str = DEFAULT_PROMPT,
              default_max_new_tokens: int = 64) -> gr.Blocks:
    """The demo page around a ``Pipeline`` (or a zero-argument callable returning one, called here, once).

    ``examples``: ``[[image_path], ...]`` or ``[[image_path, prompt], ...]`` shown as clickable samples
    (default: the bundled ``assets/images/*.png``).
    The handler is ``app.mmspec_backend.generate``.
    """
    import gradio as gr

    from mmspec.pipeline import BUNDLED_TARGET, Pipeline

    pipe = pipe_or_factory if isinstance(pipe_or_factory, Pipeline) else pipe_or_factory()
    backend = DemoBackend(pipe)
    if examples is None:
        examples = sample_examples()
    name_or_path = str(getattr(pipe.target.config, "_name_or_path", "") or "target")
    target_name = ("the bundled default (assets/models/target)" if Path(name_or_path) == BUNDLED_TARGET
                   else name_or_path if not Path(name_or_path).is_dir() else Path(name_or_path).name)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {html.escape(title)}\n"
                    f"Target VLM **{html.escape(target_name)}**, loaded drafter **{html.escape(pipe.drafter_kind)}** "
                    f"(pick another kind in the settings). "
                    "A small drafter guesses the next tokens; the VLM checks them all in one forward and keeps the "
                    "longest correct prefix plus one token of its own, so the answer is exactly the VLM's own."
                    + (BUNDLED_NOTE if Path(name_or_path) == BUNDLED_TARGET else ""))
        with gr.Row():
            with gr.Column(scale=1):
                image = raw_image_input(label="Image", sources=["upload", "clipboard"], elem_id="image-input",
                                        height=260)
                prompt = gr.Textbox(label="Prompt", value=default_prompt, lines=2, elem_id="prompt")
                with gr.Accordion("Settings", open=True):
                    kind = gr.Dropdown(backend.kinds, value=pipe.drafter_kind, label="Drafter kind",
                                       elem_id="drafter-kind")
                    k = gr.Slider(0, MAX_DRAFT_TOKENS, value=0, step=1, elem_id="num-draft",
                                  label="Draft tokens per round (0 = adaptive)")
                    tree = gr.Slider(0, MAX_TREE_NODES, value=0, step=1, elem_id="tree-nodes",
                                     label="Tree nodes per round (0 = a chain; eagle, text, visual and vlm drafters)")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, elem_id="temperature",
                                            label="Temperature (0 = greedy)")
                    max_new = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=default_max_new_tokens, step=1,
                                        label="Max new tokens", elem_id="max-new-tokens")
                    seed = gr.Number(value=0, precision=0, label="Seed (sampling only)", elem_id="seed")
                    compare = gr.Checkbox(False, label="Compare with plain decoding (measures the speedup)",
                                          elem_id="compare")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                if examples:
                    with_prompts = any(len(e) > 1 for e in examples)
                    gr.Examples(examples=[list(e[:2]) if with_prompts else [e[0]] for e in examples],
                                inputs=[image, prompt] if with_prompts else [image], elem_id="examples",
                                label="Sample images (click one)", cache_examples=False, examples_per_page=16)
            with gr.Column(scale=2):
                error = gr.HTML("", elem_id="error-box")
                tokens = gr.HTML(LEGEND, label="Tokens, round by round", elem_id="tokens")
                final = gr.Textbox(label="Final text", elem_id="final-text", lines=3, interactive=False,
                                   buttons=["copy"])
                stats = gr.HTML("", label="Stats", elem_id="stats")
                table = gr.Dataframe(headers=["round", "draft", "accepted", "VLM token"], value=[],
                                     label="Rounds", elem_id="rounds", interactive=False, wrap=True, max_height=360)
        button.click(backend.generate, inputs=[image, prompt, kind, k, temperature, max_new, compare, seed, tree],
                     outputs=[tokens, table, stats, final, error], api_name="generate")
    # several requests at once, so they share the engine's batch (``launch`` sets the limit from --concurrency)
    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY)
    demo.mmspec_backend = backend
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, concurrency: int = DEFAULT_CONCURRENCY,
           block: bool = True, quiet: bool = False):
    """Queue (``concurrency`` requests at once, the rest wait in line) and serve ``demo``."""
    if concurrency < 1:
        raise MMSpecError(f"--concurrency must be at least 1, got {concurrency}")
    if not max_upload_mb > 0:
        raise MMSpecError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    demo.queue(default_concurrency_limit=concurrency, max_size=max(16, 8 * concurrency))
    allowed = [str(SAMPLE_IMAGES)] if SAMPLE_IMAGES.is_dir() else []
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       max_file_size=int(max_upload_mb * 1024 * 1024), allowed_paths=allowed, css=CSS,
                       footer_links=[], quiet=quiet, show_error=False, inbrowser=False, ssr_mode=False)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmspec.cli import add_model_arguments

    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", default=False,
                        help="also open a public gradio.live link (off by default)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest image upload accepted, in MB (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"requests generated at once, decoded together in one batch per drafter kind; others "
                             f"wait in a queue (default: {DEFAULT_CONCURRENCY})")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="initial value of the slider (default: 64)")
    add_model_arguments(parser)


def run(args) -> int:
    from mmspec.cli import load_from_args

    if not 0 < args.port < 65536:
        raise MMSpecError(f"--port must be in 1..65535, got {args.port}")
    if args.concurrency < 1:
        raise MMSpecError(f"--concurrency must be at least 1, got {args.concurrency}")
    if not args.max_upload_mb > 0:
        raise MMSpecError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    pipe = load_from_args(args)
    demo = build_app(pipe, default_max_new_tokens=max(1, min(args.max_new_tokens, MAX_NEW_TOKENS_LIMIT)))
    try:
        _, local_url, share_url = launch(demo, host=args.host, port=args.port, share=args.share,
                                         max_upload_mb=args.max_upload_mb, concurrency=args.concurrency,
                                         block=False, quiet=True)
    except OSError as e:  # port taken, address not available
        raise MMSpecError(f"cannot listen on {args.host}:{args.port} ({e}); pick another --port/--host") from None
    print(f"mmspec demo: serving on {local_url}" + (f" and publicly on {share_url}" if share_url else "")
          + "  (Ctrl+C to stop)", file=sys.stderr, flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m demos.app`` is ``mmspec demo``: the same flags, errors and exit codes."""
    from mmspec.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
