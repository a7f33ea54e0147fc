"""What every drafter with a model forward shares: its batch, ``ModelDraftBatch`` (text, visual, vlm, eagle), and
for a drafter model that speaks the target's tokenizer, ``ModelDrafter`` (text, visual, vlm: loading, vocabulary).

The rows share one cache of slots (``kv.SlotCache``) and feed in its order. A round's drafting rows (k > 0) first
catch up: each is fed what its cache lacks (a joining row its whole prompt, prefilled in a fresh cache that then
joins the shared one; a running row what was emitted since). Then they draft a chain (``draft_block``, one forward
per token) or a tree (``grow_tree``, one forward per depth, every node seeing only its own path); ``update``
keeps what was accepted and rolls the rest back.

A kind supplies how it feeds its model and reads logits:
- ``_open(row, spec)``: the row's state, kept in ``state[row]`` (a token-fed row: ``FedTokens``);
- ``_inputs(ids, prev)``: the model's inputs [B, T, ...] for drafted tokens ids [B, T] (``prev[b]``: the outputs
  after each token's parent, for drafters that feed them back);
- ``_model(slots, x, parents, **tree)``: one forward of ``x`` over ``slots``' rows -> outputs [B, T, ...];
- ``_logits(out)``: outputs -> float32 logits over the target's vocabulary, undraftable ids at -inf (by default
  the outputs are such logits and only the drafter's ``bad_ids`` are masked).
Token-fed kinds get the rest; a kind that feeds something else (eagle: the target's hidden states) also says
what its cache lacks (``_waiting``), what a round adds (``_append``) and when a row may draft (``_room``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmspec.drafters.base import DraftBatch, Drafter, RowSpec, draft_block
from mmspec.drafters.vocab import check_same_tokenizer, undraftable_ids
from mmspec.kv import SlotCache
from mmspec.targets.base import TargetAdapter
from mmspec.trees import Draft, TreeFeeds, TreeShape, chain, grow_tree


@dataclass
class FedTokens:
    """A row of a drafter fed token ids: what its cache lacks."""

    ids: list[int]                         # token ids not in the cache yet
    size: int                              # positions of the drafter's sequence, cached or not
    before: torch.Tensor | None = None     # [m, hidden] fed before ``ids`` in the row's prefill (visual tokens)


class ModelDraftBatch(DraftBatch):
    """The rows of one model-backed drafter; a kind subclasses it with its hooks (module docstring)."""

    keeps_drafts = True   # False: the cache drops every draft after the round (eagle: they were the head's guesses)

    def __init__(self, drafter: Drafter, slots: SlotCache):
        self.drafter = drafter
        self.slots = slots
        self.device = slots.device
        self.specs: dict = {}
        self.state: dict = {}      # row -> the kind's own state (``_open``)
        self.fresh: set = set()    # rows not in ``slots`` yet
        self.base: dict = {}       # row -> its cache length before this round's drafts
        self.bad = drafter.bad_ids.to(self.device)
        # a chain ends before a token the drafter is less sure of than this (a kind may adapt it: layerskip)
        self.stop_threshold = drafter.stop_threshold

    # ----- what a kind supplies -------------------------------------------------------------------------
    def _open(self, row, spec: RowSpec):
        raise NotImplementedError

    def _inputs(self, ids: torch.Tensor, prev: list | None) -> torch.Tensor:
        raise NotImplementedError

    def _model(self, slots: SlotCache, x: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        raise NotImplementedError

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        """By default ``out`` are the drafter's logits over the target's vocabulary."""
        return out.masked_fill(self.bad, float("-inf"))

    # token-fed rows (``FedTokens``) unless the kind says otherwise
    def _room(self, row) -> int:
        """How many tokens the row may draft now (0: none yet)."""
        return self.drafter.context_length - self.state[row].size

    def _waiting(self, row) -> torch.Tensor | None:
        """The inputs [n, ...] the row's cache lacks, taken from the row (they are fed now); None: nothing."""
        st = self.state[row]
        if not st.ids and st.before is None:
            return None
        x = self._inputs(torch.tensor(st.ids, dtype=torch.long, device=self.device)[None], None)[0]
        if st.before is not None:
            x = torch.cat([st.before.to(x.dtype), x])
            st.before = None
        st.ids = []
        return x

    def _append(self, row, emitted: list[int], kept: int, hidden: torch.Tensor | None) -> None:
        """After a round: ``emitted`` joined the row's sequence and its cache kept the first ``kept`` of them."""
        st = self.state[row]
        st.ids += self.drafter.readable(emitted[kept:])
        st.size += len(emitted)

    # ----- rows -----------------------------------------------------------------------------------------
    def add(self, row, spec: RowSpec) -> None:
        self.state[row] = self._open(row, spec)
        self.specs[row] = spec
        self.fresh.add(row)

    def remove(self, rows) -> None:
        for r in rows:
            for d in (self.specs, self.state, self.base):
                d.pop(r, None)
            self.fresh.discard(r)
        self.slots.remove(rows)

    # ----- feeding --------------------------------------------------------------------------------------
    def _forward(self, slots: SlotCache, x: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        """One forward; every new token is kept (tree nodes stay hidden until the round ends)."""
        out = self._model(slots, x, parents, **tree)
        if not tree:
            slots.commit([list(range(len(p))) for p in parents])
        return out

    def _feed(self, slots: SlotCache, items: dict) -> dict:
        """Feed each row of ``items`` its inputs [n, ...] (a chain) in one forward of ``slots``' rows -> row -> the
        output after its last input."""
        order = slots.rows
        counts = [items[r].shape[0] if r in items else 0 for r in order]
        some = next(iter(items.values()))
        x = torch.zeros(len(order), max(counts), *some.shape[1:], dtype=some.dtype, device=self.device)
        for b, r in enumerate(order):
            if counts[b]:
                x[b, :counts[b]] = items[r]
        out = self._forward(slots, x, [chain(n) for n in counts])
        return {r: out[b, counts[b] - 1] for b, r in enumerate(order) if counts[b]}

    def _catch_up(self, rows: list) -> dict:
        """Feed every row what its cache lacks -> row -> the output after its last input (every row of ``rows``)."""
        last = {}
        joining = [r for r in rows if r in self.fresh]
        if joining:
            # the joining rows' prefills run together, then join the shared cache
            slots = self.slots.empty_like()
            for r in joining:
                slots.add_empty(r)
            last.update(self._feed(slots, {r: self._waiting(r) for r in joining}))
            self.slots.absorb(slots)
            self.fresh.difference_update(joining)
        waiting = {r: self._waiting(r) for r in self.slots.rows if r not in last}
        waiting = {r: x for r, x in waiting.items() if x is not None}
        if waiting:
            last.update(self._feed(self.slots, waiting))
        return last

    # ----- the drafter interface ------------------------------------------------------------------------
    def propose(self, ks: dict, tree_nodes: dict | None = None) -> dict:
        out = {r: Draft(torch.empty(0, dtype=torch.long, device=self.device)) for r in ks}
        # (a tree's nodes sit at depth < k, like a chain's)
        ks = {r: min(k, self._room(r)) for r, k in ks.items()}
        rows = [r for r, k in ks.items() if k > 0]
        if not rows:
            return out
        last = self._catch_up(rows)
        for r in rows:
            self.base[r] = self.slots.length(r)
        first = self._logits(torch.stack([last[r] for r in rows]))
        if tree_nodes:
            out.update(zip(rows, self._trees(rows, last, first, ks, tree_nodes)))
            for r in rows:     # nothing of a tree stays: the accepted tokens are fed again with the next catch-up
                del self.base[r]
            self.slots.tidy()
            return out
        out.update(zip(rows, self._chains(rows, last, first, ks)))
        return out

    def update(self, results: dict, hidden: dict | None = None) -> None:
        for r, (n_accepted, emitted) in results.items():
            kept = 0
            if r in self.base:
                # the cache holds the row's sequence, then the drafts fed after ``base``: keep the accepted ones
                base = self.base.pop(r)
                kept = min(n_accepted, self.slots.length(r) - base) if self.keeps_drafts else 0
                self.slots.truncate(r, base + kept)
            self._append(r, emitted, kept, None if hidden is None else hidden.get(r))

    # ----- chains and trees -----------------------------------------------------------------------------
    def _chains(self, rows: list, last: dict, first: torch.Tensor, ks: dict) -> list[Draft]:
        order = self.slots.rows
        at = [order.index(r) for r in rows]
        idx = torch.tensor(at, device=self.device)
        # every row of the cache takes part in each forward (rows not drafting feed padding)
        parents = [[-1] if b in at else [] for b in range(len(order))]
        prev = [last[r] for r in rows]       # each row's output after its latest token

        def step(tokens: torch.Tensor) -> torch.Tensor:
            # tokens [len(rows)] -> the next logits [len(rows), vocab]
            ids = torch.zeros(len(order), 1, dtype=torch.long, device=self.device)
            ids[idx, 0] = tokens
            fed_after = [[] for _ in order]
            for i, b in enumerate(at):
                fed_after[b] = [prev[i]]
            out = self._forward(self.slots, self._inputs(ids, fed_after), parents)[:, 0].index_select(0, idx)
            prev[:] = list(out)
            return self._logits(out)

        return draft_block(first, step, [ks[r] for r in rows], [self.specs[r] for r in rows],
                           self.drafter.target.vocab_size, self.drafter.eos_ids, self.stop_threshold)

    def _trees(self, rows: list, last: dict, first: torch.Tensor, ks: dict, tree_nodes: dict) -> list[Draft]:
        """EAGLE-2 dynamic trees, one depth per forward; the nodes are dropped after the round."""
        feeds_state = TreeFeeds(self.slots)
        outs = {r: {-1: last[r]} for r in rows}     # row -> node -> the output after it

        def expand(feeds_per_row):
            feeds = {r: nodes for r, nodes in zip(rows, feeds_per_row) if nodes}
            order = self.slots.rows
            ids = torch.zeros(len(order), max(len(v) for v in feeds.values()), dtype=torch.long)
            fed_after = [[] for _ in order]
            for b, r in enumerate(order):
                for j, (_, tok, parent, _) in enumerate(feeds.get(r, [])):
                    ids[b, j] = tok
                    fed_after[b].append(outs[r][parent])
            x = self._inputs(ids.to(self.device), fed_after)
            out = self._forward(self.slots, x, **feeds_state.extend_args(feeds))
            logits = self._logits(out)
            result = []
            for r, nodes in zip(rows, feeds_per_row):
                b = order.index(r)
                for j, (node, *_) in enumerate(nodes):
                    outs[r][node] = out[b, j]
                result.append(logits[b, :len(nodes)] if nodes else None)
            return result

        shapes = [TreeShape.of(tree_nodes[r]) for r in rows]
        return grow_tree(first, expand, [s.nodes for s in shapes], [ks[r] for r in rows], self.drafter.eos_ids,
                         floor=[self.drafter.tree_floor if s.floor is None else s.floor for s in shapes],
                         spines=[min(s.spine, ks[r]) for s, r in zip(shapes, rows)])


class ModelDrafter(Drafter):
    """A drafter with a model of its own that speaks the target's tokenizer (text, visual, vlm): how it loads, and
    the ids it must never propose (``bad_ids``, ``banned`` among them) or cannot read (``readable``)."""

    needs_weights = True
    grows_trees = True
    auto_classes = (AutoModelForCausalLM, AutoTokenizer)   # the loaders of its model and tokenizer (or processor)

    @classmethod
    def from_pretrained(cls, target: TargetAdapter, path, dtype, trust_remote_code: bool = False) -> "ModelDrafter":
        from mmspec.loading import from_pretrained

        model_class, processor_class = cls.auto_classes
        kw = dict(trust_remote_code=trust_remote_code)
        model = from_pretrained(model_class, "drafter", path, dtype=dtype, use_safetensors=True, **kw)
        what = "tokenizer" if processor_class is AutoTokenizer else "processor"
        processor = from_pretrained(processor_class, f"drafter {what}", path, **kw)
        return cls(target, model.to(target.device).eval(), processor)

    def __init__(self, target: TargetAdapter, model, tokenizer, banned: frozenset[int]):
        super().__init__(target)
        check_same_tokenizer(target.tokenizer, tokenizer, target.image_token_ids)
        self.model = model
        self.bad_ids = undraftable_ids(model.get_output_embeddings().weight.shape[0], target.vocab_size, tokenizer,
                                       banned)
        self.embedding_rows = model.get_input_embeddings().weight.shape[0]
        unk = tokenizer.unk_token_id
        self.unk_id = int(unk if unk is not None else (tokenizer.eos_token_id or 0))

    def readable(self, ids: list[int]) -> list[int]:
        """Ids the drafter has no embedding row for (the target's padding rows) are fed to it as unknown."""
        return [t if t < self.embedding_rows else self.unk_id for t in ids]


__all__ = ["FedTokens", "ModelDraftBatch", "ModelDrafter"]
