"""``drafter_kind="text"``: a small causal LM sharing the target's tokenizer, drafting from the prompt text alone.

It never sees image tokens: its prompt is the target's prompt with every image placeholder removed. Ids it
cannot produce (the target's padding rows, image placeholders) get draft probability 0.
"""

from __future__ import annotations

import torch

from mmspec.drafters.base import Draft, DraftBatch, Drafter, RowSpec, TreeFeeds, draft_block, grow_tree
from mmspec.drafters.vocab import check_same_tokenizer, undraftable_ids
from mmspec.kv import CACHE_KW, SlotCache, chain
from mmspec.targets.base import Request, TargetAdapter


LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def lean_forward(model, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """The decoder's own layers, without the output plumbing of its ``forward`` (the 4-D mask is ready-made).
    Drafting is latency-bound and its numerics never change what is emitted; this saves a tiny drafter a
    good part of its step. embeds [B, T, hidden] -> last hidden states [B, T, hidden]."""
    inner = model.model
    hidden = embeds
    rotary = inner.rotary_emb(hidden, positions)
    for layer in inner.layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary,
                       use_cache=True, **{CACHE_KW: cache})
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return inner.norm(hidden)


def full_forward(model, embeds, mask, positions, cache) -> torch.Tensor:
    return model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{CACHE_KW: cache}).last_hidden_state


def lean_step_works(model) -> bool:
    """Use the lean forward only where it reproduces the model's own (checked once, at load)."""
    if getattr(model.config, "model_type", None) not in LEAN_MODEL_TYPES or getattr(model.config, "sliding_window", None):
        return False
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    try:
        with torch.inference_mode():
            device = model.get_input_embeddings().weight.device
            ids = torch.arange(1, 6, device=device) % model.config.vocab_size
            ref = model(input_ids=ids[None]).logits[0, -1]
            slots = SlotCache(model.config, device, model.dtype)
            slots.add_empty(0)
            mask, pos = slots.extend([chain(5)])
            got = model.lm_head(lean_forward(model, inner.embed_tokens(ids[None]), mask, pos, slots.cache))[0, -1]
        return bool(torch.allclose(ref.float(), got.float(), atol=1e-3, rtol=1e-3))
    except Exception:  # another layer signature: the regular forward is always right
        return False


class CausalLMDraftBatch(DraftBatch):
    """Rows drafting autoregressively with one causal LM over a shared ``SlotCache``. Row r's drafter sequence
    is ``seq[r]`` (prompt as the drafter sees it, then the output); ``cached[r]`` of it is in the cache, after
    ``offset[r]`` prefix positions (visual tokens)."""

    def __init__(self, drafter: "TextDrafter"):
        self.drafter = drafter
        self.model = drafter.model
        self.forward_fn = lean_forward if drafter.lean_step else full_forward
        self.embed = self.model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.bad = drafter.bad_ids.to(self.device)
        self.rows_in_vocab = self.embed.weight.shape[0]
        self.target_vocab = drafter.target.vocab_size
        self.slots = SlotCache(self.model.config, self.device, self.embed.weight.dtype)
        self.specs: dict = {}
        self.seq: dict = {}
        self.cached: dict = {}
        self.offset: dict = {}
        self.prefix: dict = {}        # row -> [1, m, hidden] visual tokens not yet fed (fresh rows)
        self.fed: dict = {}           # row -> cache length before this round's drafts were fed
        self.fresh: set = set()

    def _readable(self, ids: list[int]) -> list[int]:
        unk = self.drafter.unk_id
        return [t if t < self.rows_in_vocab else unk for t in ids]

    def add(self, row, spec: RowSpec) -> None:
        self.specs[row] = spec
        self.seq[row] = self._readable(spec.request.text_only_ids)
        self.cached[row] = 0
        prefix = self.drafter.prefix_embeds(spec.request)
        self.prefix[row] = prefix
        self.offset[row] = 0 if prefix is None else prefix.shape[1]
        self.fresh.add(row)

    def remove(self, rows) -> None:
        for r in rows:
            for d in (self.specs, self.seq, self.cached, self.offset, self.prefix, self.fed):
                d.pop(r, None)
            self.fresh.discard(r)
        self.slots.remove(rows)

    def _run(self, slots: SlotCache, embeds: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        """One forward of ``slots``' rows; every new token is kept (tree nodes stay hidden until settled).
        -> logits [B, T, vocab] (float32)."""
        mask, pos = slots.extend(parents, **tree)
        hidden = self.forward_fn(self.model, embeds, mask, pos, slots.cache)
        if not tree:
            slots.commit([list(range(len(p))) for p in parents])
        return self.model.lm_head(hidden).float()

    def _tree(self, rows: list, first: torch.Tensor, ks: dict, tree_nodes: dict) -> list[Draft]:
        """EAGLE-2 dynamic trees, one depth per forward; the nodes are dropped after the round (the accepted
        tokens are fed again with the next catch-up, in the same forward that feeds the target's token)."""
        feeds_state = TreeFeeds(self.slots)

        def expand(feeds_per_row):
            feeds = {r: nodes for r, nodes in zip(rows, feeds_per_row) if nodes}
            order = self.slots.rows
            T = max(len(v) for v in feeds.values())
            ids = torch.zeros(len(order), T, dtype=torch.long, device=self.device)
            for b, r in enumerate(order):
                for j, (_, tok, _, _) in enumerate(feeds.get(r, [])):
                    ids[b, j] = tok
            logits = self._run(self.slots, self.embed(ids), **feeds_state.extend_args(feeds))
            return [logits[order.index(r), : len(nodes)].masked_fill(self.bad, float("-inf")) if nodes else None
                    for r, nodes in zip(rows, feeds_per_row)]

        return grow_tree(first, expand, [tree_nodes[r] for r in rows], max(ks[r] for r in rows),
                         self.drafter.eos_ids, floor=self.drafter.tree_floor)

    def _catch_up(self, rows: list) -> torch.Tensor:
        """Feed every row what its cache lacks; -> [len(rows), vocab] logits after each row's last token."""
        last = {}
        joining = [r for r in rows if r in self.fresh]
        if joining:
            # the joining rows' prefills run together, then join the shared cache
            slots = SlotCache(self.model.config, self.device, self.slots.dtype)
            embeds = []
            for r in joining:
                slots.add_empty(r)
                emb = self.embed(torch.tensor(self.seq[r], dtype=torch.long, device=self.device))
                if self.prefix[r] is not None:
                    emb = torch.cat([self.prefix[r][0].to(emb.dtype), emb], dim=0)
                embeds.append(emb)
            T = max(e.shape[0] for e in embeds)
            batch = torch.zeros(len(joining), T, embeds[0].shape[-1], dtype=embeds[0].dtype, device=self.device)
            for b, e in enumerate(embeds):
                batch[b, : e.shape[0]] = e
            logits = self._run(slots, batch, [chain(e.shape[0]) for e in embeds])
            self.slots.absorb(slots)
            for b, r in enumerate(joining):
                last[r] = logits[b, embeds[b].shape[0] - 1]
                self.cached[r] = len(self.seq[r])
                self.fresh.discard(r)
                self.prefix[r] = None
        rest = [r for r in self.slots.rows if r not in last]
        if rest:
            new = {r: self.seq[r][self.cached[r]:] for r in rest}
            T = max(len(v) for v in new.values())
            if T:
                pad = torch.zeros(len(self.slots.rows), T, dtype=torch.long, device=self.device)
                counts = []
                for b, r in enumerate(self.slots.rows):
                    v = new.get(r, [])
                    pad[b, :len(v)] = torch.tensor(v, dtype=torch.long)
                    counts.append(len(v))
                logits = self._run(self.slots, self.embed(pad), [chain(n) for n in counts])
                for b, r in enumerate(self.slots.rows):
                    if r in new and counts[b]:
                        last[r] = logits[b, counts[b] - 1]
                        self.cached[r] = len(self.seq[r])
        return torch.stack([last[r].masked_fill(self.bad, float("-inf")) for r in rows])

    def propose(self, ks: dict, tree_nodes: dict | None = None) -> dict:
        out = {r: Draft(torch.empty(0, dtype=torch.long, device=self.device)) for r in ks}
        limit = self.drafter.context_length
        # (a tree's nodes sit at depth < k, like a chain's)
        ks = {r: min(k, limit - self.offset[r] - len(self.seq[r])) for r, k in ks.items()}
        rows = [r for r, k in ks.items() if k > 0]
        if not rows:
            return out
        first = self._catch_up(rows)
        for r in self.slots.rows:
            self.fed[r] = self.slots.length(r)
        if tree_nodes:
            for r, d in zip(rows, self._tree(rows, first, ks, tree_nodes)):
                out[r] = d
                self.fed.pop(r, None)      # nothing of the tree stays: the accepted tokens are fed again
            self.slots.tidy()
            return out
        order = self.slots.rows

        def step(tokens: torch.Tensor) -> torch.Tensor:
            # tokens [len(rows)]: every row of the cache feeds one token (rows not drafting feed padding)
            feed = torch.zeros(len(order), 1, dtype=torch.long, device=self.device)
            for i, r in enumerate(rows):
                feed[order.index(r), 0] = tokens[i]
            parents = [[-1] if r in ks and ks[r] > 0 else [] for r in order]
            logits = self._run(self.slots, self.embed(feed), parents)[:, 0]
            idx = torch.tensor([order.index(r) for r in rows], device=self.device)
            return logits.index_select(0, idx).masked_fill(self.bad, float("-inf"))

        drafts = draft_block(first, step, [ks[r] for r in rows], [self.specs[r] for r in rows],
                             self.target_vocab, self.drafter.eos_ids)
        out.update(zip(rows, drafts))
        return out

    def update(self, results: dict, hidden: dict | None = None) -> None:
        for r, (n_accepted, emitted) in results.items():
            before = len(self.seq[r])
            self.seq[r].extend(self._readable(emitted))
            if r in self.fed:
                # the cache holds seq + the drafts fed after ``fed``; the accepted ones stay valid
                base = self.fed.pop(r)
                kept = min(n_accepted, self.slots.length(r) - base)
                self.slots.truncate(r, base + kept)
                self.cached[r] = before + kept


class TextDrafter(Drafter):
    kind = "text"
    default_k = 4
    needs_weights = True
    grows_trees = True

    @classmethod
    def from_pretrained(cls, target: TargetAdapter, path, dtype, trust_remote_code: bool = False) -> "TextDrafter":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mmspec.loading import from_pretrained

        kw = dict(trust_remote_code=trust_remote_code)
        model = from_pretrained(AutoModelForCausalLM, "drafter", path, dtype=dtype, use_safetensors=True, **kw)
        tokenizer = from_pretrained(AutoTokenizer, "drafter tokenizer", path, **kw)
        return cls(target, model.to(target.device).eval(), tokenizer)

    def __init__(self, target: TargetAdapter, model, tokenizer):
        super().__init__(target)
        check_same_tokenizer(target.tokenizer, tokenizer, target.image_token_ids)
        self.model = model
        self.tokenizer = tokenizer
        rows = model.get_output_embeddings().weight.shape[0]
        self.bad_ids = undraftable_ids(rows, target.vocab_size, tokenizer, target.image_token_ids)
        self.lean_step = lean_step_works(model)
        unk = tokenizer.unk_token_id
        self.unk_id = int(unk if unk is not None else (tokenizer.eos_token_id or 0))
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)

    def prefix_embeds(self, request: Request) -> torch.Tensor | None:
        """Embeddings fed before the prompt text ([1, m, hidden]); none for a text-only drafter."""
        return None

    def batch(self) -> CausalLMDraftBatch:
        return CausalLMDraftBatch(self)
