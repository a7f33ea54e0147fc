"""The engine's side of the target: ``TargetBatch`` runs the rows in flight through the target's own decoder, one
forward per round, over one KV cache of slots (``mmspec.kv.SlotCache``); ``TargetSession`` is one request on its
own. Everything family-specific comes from the row's adapter (``TargetAdapter.prompt_embeds``, ``positions``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmspec.kv import CACHE_KW, SlotCache
from mmspec.trees import chain

if TYPE_CHECKING:   # annotations only: ``targets.base`` imports this module for ``TargetAdapter.session``
    from mmspec.targets.base import Request, TargetAdapter


class AuxCapture:
    """``want_hidden`` as HF ``hidden_states`` indices (an EAGLE-3 head's aux layers): index i < N is the
    residual stream entering decoder layer i (a forward pre-hook reads it; the logits are untouched), N the last
    (normed) hidden state. ``states(last)`` -> their concatenation [B, T, len(ids) * hidden], ids ascending."""

    def __init__(self, decoder, ids):
        self.ids = sorted(int(i) for i in ids)
        self.layers = decoder.layers
        self.got: dict = {}
        self.handles = []

    def __enter__(self):
        for i in self.ids:
            if i < len(self.layers):
                hook = lambda m, args, kw, i=i: self.got.__setitem__(i, args[0] if args else kw["hidden_states"])  # noqa: E731
                self.handles.append(self.layers[i].register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def states(self, last: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.got[i] if i < len(self.layers) else last for i in self.ids], dim=-1)


@dataclass
class Prefill:
    """The slots of the rows prefilled by one ``verify``, not yet merged into ``TargetBatch.main``.
    ``prompt_lengths[b]`` is row ``slots.rows[b]``'s prompt length: those slots are kept whatever is accepted."""

    slots: SlotCache
    prompt_lengths: list[int]

    def by_row(self) -> dict:
        """row -> prompt length, in the order of ``slots.rows``."""
        return dict(zip(self.slots.rows, self.prompt_lengths))


class TargetBatch:
    """The target's side of a batch of requests: one KV cache of slots (``mmspec.kv.SlotCache``), each row with
    its own length and positions. Rows join with ``add`` and leave with ``remove`` at any round.

    ``verify`` runs ONE forward of every row's new tokens (the pending token then its drafts, a chain or a tree
    given by parents) and returns their logits, plus the last hidden states when ``want_hidden`` (True), or the
    states of the HF ``hidden_states`` indices it lists (a tuple: ``AuxCapture``); ``commit``
    keeps what was accepted. A row's prefill waits for its first ``verify``: it runs in that same call (alone,
    so it costs the running rows nothing), with the prompt's last position as the pending token.
    """

    def __init__(self, adapter: TargetAdapter, want_hidden: bool = False):
        model = adapter.model
        self.adapter = adapter
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.config = model.config.get_text_config()
        self.want_hidden = want_hidden
        self.main = self._slots()
        self.positions: dict = {}        # row -> Positions
        self.extras: dict = {}           # row -> ``adapter.prompt_extras`` until its prefill (Qwen3-VL DeepStack)
        self.groups: dict = {}           # row -> ``adapter.attention_groups`` until its prefill (Gemma 3)
        self.fresh: dict = {}            # row -> (embeds of the positions before the pending one, pending's embed)
        self.prefilled: list[Prefill] = []   # prefills not yet merged into ``main``
        self.hidden: dict = {}           # row -> [n, hidden] of the last verify, when ``want_hidden``
        self.committed_hidden: dict = {}

    def _slots(self):
        slots = SlotCache(self.config, self.device, self.dtype)
        slots.none_means = "causal"   # transformers' decoder
        return slots

    def length(self, row) -> int:
        """Positions in the row's cache, the pending one excluded (before the prefill: the prompt but its last)."""
        if row in self.fresh:
            return self.fresh[row][0].shape[1]
        return self.main.length(row)

    def add(self, row, request: Request) -> None:
        embeds = self.adapter.prompt_embeds(request)            # [1, L, hidden]
        self.fresh[row] = (embeds[:, :-1], embeds[:, -1:])
        self.positions[row] = self.adapter.positions(request)
        extra = self.adapter.prompt_extras(request)
        if extra is not None:
            self.extras[row] = extra
        groups = self.adapter.attention_groups(request)
        if groups is not None:
            self.groups[row] = groups

    def remove(self, rows) -> None:
        for r in rows:
            self.fresh.pop(r, None)
            self.positions.pop(r, None)
            self.extras.pop(r, None)
            self.groups.pop(r, None)
            self.hidden.pop(r, None)
        self.main.remove(rows)

    def _forward(self, slots, embeds: torch.Tensor, parents: list[list[int]], rows: list,
                 decoder_kwargs: dict | None = None, **tree) -> tuple:
        """embeds [B, T, hidden] of ``rows`` (the order of ``slots.rows``) -> logits [B, T, vocab], hidden.
        ``tree``: ``SlotCache.extend``'s keywords for nodes grown over several forwards (``forward_nodes``)."""
        mask, logical = slots.extend(parents, **tree)
        pos = torch.stack([self.positions[r](logical[b]) for b, r in enumerate(rows)], dim=1)  # [P, B, T]
        pos = pos[0] if pos.shape[0] == 1 else pos
        aux = None if self.want_hidden in (False, True) else AuxCapture(self.decoder, self.want_hidden)
        with aux or nullcontext():
            out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                               **{CACHE_KW: slots.cache}, **(decoder_kwargs or {}))
        hidden = out.last_hidden_state
        return self.head(hidden).float(), hidden if aux is None else aux.states(hidden)

    def _prefill_groups(self, joining: list, lengths: list[int], width: int) -> dict:
        """``SlotCache.extend``'s ``groups`` for a prefill of ``joining`` (padded to ``width``): each prompt
        position's image-attention group (-1: causal only), or nothing when no row has any."""
        groups = [self.groups.pop(r, None) for r in joining]
        if all(g is None for g in groups):
            return {}
        out = torch.full((len(joining), width), -1, dtype=torch.long)
        for b, g in enumerate(groups):
            if g is not None:
                n = min(len(g), lengths[b])      # a truncated prompt keeps its first positions
                out[b, :n] = g[:n]
        return {"groups": out}

    def verify(self, ids: dict, parents: dict | None = None) -> dict:
        """ids: row -> [n] (the pending token then the drafts); parents: row -> n parent indices (``-1`` for
        the pending token; default a chain). Returns row -> logits [n, vocab] (float32); row i predicts the
        token after node i."""
        parents = parents or {}
        out = {}
        joining = [r for r in ids if r in self.fresh]
        if joining:
            # the joining rows' prefills run together, apart from the running rows (whose rounds are short)
            slots = self._slots()
            for r in joining:
                slots.add_empty(r)
            embeds, full, starts, kept = [], [], [], []
            for r in joining:
                prompt, first = self.fresh.pop(r)
                new = ids[r].to(self.device)
                emb = self.embed(new[None])
                if first is not None:
                    emb = torch.cat([first.to(emb.dtype), emb[:, 1:]], dim=1)
                embeds.append(torch.cat([prompt.to(emb.dtype), emb], dim=1)[0])
                L = prompt.shape[1]
                par = parents.get(r) or chain(len(new))
                full.append(chain(L) + [p + L if p >= 0 else L - 1 for p in par])
                starts.append(L)
                kept.append(L + (first is not None))   # prompt positions in this forward
            T = max(e.shape[0] for e in embeds)
            batch = torch.zeros(len(joining), T, embeds[0].shape[-1], dtype=embeds[0].dtype, device=self.device)
            for b, e in enumerate(embeds):
                batch[b, : e.shape[0]] = e
            extras = [self.extras.pop(r, None) for r in joining]
            kw = self.adapter.prefill_kwargs(extras, kept, T) if any(e is not None for e in extras) else None
            block = self._prefill_groups(joining, [e.shape[0] for e in embeds], T)
            slots.min_keep = min(starts)    # a recurrent model records states from there on only
            logits, hidden = self._forward(slots, batch, full, joining, decoder_kwargs=kw, **block)
            self.prefilled.append(Prefill(slots, starts))
            for b, r in enumerate(joining):
                n = int(ids[r].shape[0])
                out[r] = logits[b, starts[b]: starts[b] + n]
                if self.want_hidden:   # the prompt's positions too: they are committed with this round
                    self.hidden[r] = hidden[b, : starts[b] + n]
        rows = self.main.rows
        counts = [int(ids[r].shape[0]) if r in ids else 0 for r in rows]
        T = max(counts, default=0)
        if T:
            # rows not given (or given nothing) take part as padding: their caches only grow holes
            pad = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
            for b, r in enumerate(rows):
                if counts[b]:
                    pad[b, :counts[b]] = ids[r].to(self.device)
            logits, hidden = self._forward(self.main, self.embed(pad),
                                           [(parents.get(r) or chain(n)) if n else [] for r, n in zip(rows, counts)],
                                           rows)
            for b, r in enumerate(rows):
                if r in ids:
                    out[r] = logits[b, :counts[b]]
                    if self.want_hidden:
                        self.hidden[r] = hidden[b, :counts[b]]
        else:
            for r in rows:
                if r in ids:
                    out[r] = torch.empty(0, self.head.weight.shape[0], device=self.device)
        return out

    def forward_nodes(self, ids: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        """One forward of the running rows' tokens that commits nothing: a drafter VLM growing a tree feeds its
        nodes depth by depth this way. ids [B, T] in the order of ``main.rows`` (rows feeding nothing pad);
        ``parents`` and ``tree`` are ``SlotCache.extend``'s arguments (``TreeFeeds.extend_args``: each node sees
        the row's committed slots and its own fed ancestors, at position length + depth, mapped by the row's
        ``Positions``; its slot stays hidden and the next ``tidy`` crops it). -> logits [B, T, vocab] (float32)."""
        return self._forward(self.main, self.embed(ids), parents, self.main.rows, **tree)[0]

    def tidy(self) -> None:
        """Crop slots no row uses (a tree's hidden nodes after ``forward_nodes``)."""
        self.main.tidy()

    def commit(self, keep: dict) -> None:
        """keep: row -> indices (into the row's last verified tokens, root first) that stay in the cache.
        With ``want_hidden``, ``committed_hidden[row]`` is then the last hidden states of the positions this
        commit added, in order (for a row's first round: its whole prompt, then what was kept)."""
        if self.want_hidden:
            self.committed_hidden = {}
            starts = {r: L for prefill in self.prefilled for r, L in prefill.by_row().items()}
            for r, idx in keep.items():
                h = self.hidden.get(r)
                if h is None:
                    continue
                L = starts.get(r, 0)
                sel = torch.tensor([L + i for i in idx], dtype=torch.long, device=h.device)
                self.committed_hidden[r] = torch.cat([h[:L], h.index_select(0, sel)])
        if self.main.rows:
            self.main.commit([list(keep.get(r, ())) for r in self.main.rows])
        for prefill in self.prefilled:
            prefill.slots.commit([list(range(L)) + [L + i for i in keep[r]] for r, L in prefill.by_row().items()])
            self.main.absorb(prefill.slots)
        self.prefilled = []

    def truncate(self, row, length: int) -> None:
        """Forget every position of ``row`` from ``length`` on (the next verify re-feeds from there)."""
        if row in self.fresh:
            prompt, first = self.fresh[row]
            if length < prompt.shape[1]:
                self.fresh[row] = (prompt[:, :length], None)
            return
        self.main.truncate(row, length)


class TargetSession:
    """One request on its own: ``forward(ids)`` appends positions and returns their logits [n, vocab],
    ``rollback(length)`` moves the cache back. A view of a one-row ``TargetBatch``, for tools and tests."""

    def __init__(self, adapter: TargetAdapter, request: Request):
        self.target_batch = TargetBatch(adapter)
        self.target_batch.add(0, request)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.target_batch.verify({0: ids})[0]
        self.target_batch.commit({0: range(int(ids.shape[0]))})
        return logits

    def rollback(self, length: int) -> None:
        self.target_batch.truncate(0, length)

    @property
    def length(self) -> int:
        return self.target_batch.length(0)
