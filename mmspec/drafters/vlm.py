"""``drafter_kind="vlm"``: a smaller VLM of the target's family drafts while seeing the image.

The drafter runs through its own target adapter (``adapter_for(model)``), so it gets the same prompt handling,
image features and positions (M-RoPE for Qwen-VL, image packing for LLaVA-NeXT, tiles for Idefics3) as that
family's target does. Its adapter shares the target's vision cache: when its vision side (vision tower, projector,
image processor) is the target's -- same config and identical tensors -- it reads the target's cached features;
otherwise its own features are cached under its own key, so a second request with the same image is a hit.

The tokenizer must be the target's (``check_same_tokenizer``); padded vocabularies on either side work: ids the
drafter has no row for get draft probability 0 and are fed to it as unknown.

Trees (``tree_nodes``) grow as the text drafter's do: nodes fed depth by depth over several forwards of the drafter
VLM (``TargetBatch.forward_nodes``), each seeing the row's committed slots and its own fed ancestors, at positions by
depth through the drafter's own ``Positions`` (M-RoPE for Qwen-VL); the nodes are dropped after the round.
"""

from __future__ import annotations

import torch

from mmspec.drafters.base import Draft, DraftBatch, Drafter, RowSpec, TreeFeeds, draft_block, grow_tree
from mmspec.drafters.vocab import check_same_tokenizer, undraftable_ids
from mmspec.targets.base import Request, TargetAdapter, TargetBatch

_META_KEYS = {"text_config", "_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version",
              "_commit_hash", "use_cache", "tie_word_embeddings"}


def vision_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer outside the language model and its head: vision tower, projector, newlines."""
    lm = {id(p) for p in model.get_decoder().parameters()}
    lm |= {id(b) for b in model.get_decoder().buffers()}
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        lm |= {id(p) for p in out_emb.parameters()}
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: t for n, t in named if id(t) not in lm}


def _vision_config(model) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k not in _META_KEYS}


def _image_processor_config(processor) -> dict:
    ip = getattr(processor, "image_processor", None)
    return {} if ip is None else {k: v for k, v in ip.to_dict().items() if not k.startswith("_")}


def shares_vision(target: TargetAdapter, drafter: TargetAdapter) -> bool:
    """True when the drafter's image features are bit-identical to the target's for every image."""
    if type(target) is not type(drafter) or target.model.dtype != drafter.model.dtype:
        return False
    if _vision_config(target.model) != _vision_config(drafter.model):
        return False
    if _image_processor_config(target.processor) != _image_processor_config(drafter.processor):
        return False
    a, b = vision_parameters(target.model), vision_parameters(drafter.model)
    if a.keys() != b.keys():
        return False
    return all(a[n].shape == b[n].shape and a[n].device == b[n].device and torch.equal(a[n], b[n]) for n in a)


class VlmDraftBatch(DraftBatch):
    """Drafting through the drafter VLM's own ``TargetBatch`` (its KV slots, positions and prefills)."""

    def __init__(self, drafter: "VlmDrafter"):
        self.drafter = drafter
        self.sess = TargetBatch(drafter.adapter)
        self.device = drafter.adapter.device
        self.bad = drafter.bad_ids.to(self.device)
        self.target_vocab = drafter.target.vocab_size
        self.context_length = drafter.adapter.context_length
        self.specs: dict = {}
        self.pending: dict = {}   # row -> ids not in the drafter's cache yet (first: the prompt's last position)
        self.base: dict = {}      # row -> cache length before this round's pending + drafts

    def add(self, row, spec: RowSpec) -> None:
        dreq = self.drafter.drafter_request(spec.request)
        self.drafter.adapter.image_features(dreq)
        self.sess.add(row, dreq)
        self.specs[row] = spec
        self.pending[row] = [dreq.prompt_ids[-1]]

    def remove(self, rows) -> None:
        for r in rows:
            self.specs.pop(r, None)
            self.pending.pop(r, None)
            self.base.pop(r, None)
        self.sess.remove(rows)

    def _step(self, ids: dict) -> dict:
        logits = self.sess.verify({r: torch.as_tensor(v, dtype=torch.long, device=self.device) for r, v in ids.items()})
        self.sess.commit({r: range(len(v)) for r, v in ids.items()})
        return {r: l[-1].masked_fill(self.bad, float("-inf")) for r, l in logits.items() if l.shape[0]}

    def _tree(self, rows: list, first: torch.Tensor, ks: dict, tree_nodes: dict) -> list[Draft]:
        """EAGLE-2 dynamic trees, one depth per forward of the drafter VLM; the nodes are dropped after the round
        (the accepted tokens are fed again with the next round's pending ids)."""
        main = self.sess.main
        feeds_state = TreeFeeds(main)

        def expand(feeds_per_row):
            feeds = {r: nodes for r, nodes in zip(rows, feeds_per_row) if nodes}
            order = main.rows
            T = max(len(v) for v in feeds.values())
            # [B, T]: every row of the drafter's cache takes part (rows not drafting feed nothing)
            ids = torch.zeros(len(order), T, dtype=torch.long, device=self.device)
            for b, r in enumerate(order):
                for j, (_, tok, _, _) in enumerate(feeds.get(r, [])):
                    ids[b, j] = tok
            logits = self.sess.forward_nodes(ids, **feeds_state.extend_args(feeds))
            return [logits[order.index(r), : len(nodes)].masked_fill(self.bad, float("-inf")) if nodes else None
                    for r, nodes in zip(rows, feeds_per_row)]

        return grow_tree(first, expand, [tree_nodes[r] for r in rows], max(ks[r] for r in rows),
                         self.drafter.eos_ids, floor=self.drafter.tree_floor)

    def propose(self, ks: dict, tree_nodes: dict | None = None) -> dict:
        out = {r: Draft(torch.empty(0, dtype=torch.long, device=self.device)) for r in ks}
        ks = {r: min(k, self.context_length - (self.sess.length(r) + len(self.pending[r]))) for r, k in ks.items()}
        rows = [r for r, k in ks.items() if k > 0]
        if not rows:
            return out
        in_cache = set(self.sess.main.rows)
        # every row already in the drafter's cache takes part in each forward (rows not drafting feed nothing)
        first = self._step({r: (self.pending[r] if r in rows else []) for r in set(rows) | in_cache})
        for r in rows:
            self.pending[r] = []
            self.base[r] = self.sess.length(r)      # after the pending ids, before the drafts
        if tree_nodes:
            for r, d in zip(rows, self._tree(rows, torch.stack([first[r] for r in rows]), ks, tree_nodes)):
                out[r] = d
                self.base.pop(r)       # nothing of the tree stays: the emitted tokens are the next pending ids
            self.sess.tidy()
            return out

        def step(tokens: torch.Tensor) -> torch.Tensor:
            feed = {r: [] for r in self.sess.main.rows}
            feed.update({r: tokens[i:i + 1] for i, r in enumerate(rows)})
            got = self._step(feed)
            return torch.stack([got[r] for r in rows])

        drafts = draft_block(torch.stack([first[r] for r in rows]), step, [ks[r] for r in rows],
                             [self.specs[r] for r in rows], self.target_vocab, self.drafter.eos_ids)
        out.update(zip(rows, drafts))
        return out

    def update(self, results: dict, hidden: dict | None = None) -> None:
        for r, (n_accepted, emitted) in results.items():
            if r not in self.base:
                self.pending[r] = self.pending[r] + self.drafter.readable(emitted)
                continue
            # the cache holds the old pending ids + the drafts fed; keep the accepted ones, feed the rest next time
            base = self.base.pop(r)
            kept = min(n_accepted, self.sess.length(r) - base)
            self.sess.truncate(r, base + kept)
            self.pending[r] = self.drafter.readable(emitted[kept:])


class VlmDrafter(Drafter):
    kind = "vlm"
    default_k = 4
    needs_weights = True
    grows_trees = True

    @classmethod
    def from_pretrained(cls, target: TargetAdapter, path, dtype, trust_remote_code: bool = False) -> "VlmDrafter":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from mmspec.loading import from_pretrained

        kw = dict(trust_remote_code=trust_remote_code)
        model = from_pretrained(AutoModelForImageTextToText, "drafter", path, dtype=dtype, use_safetensors=True,
                                **kw)
        processor = from_pretrained(AutoProcessor, "drafter processor", path, **kw)
        return cls(target, model.to(target.device).eval(), processor)

    def __init__(self, target: TargetAdapter, model, processor):
        from mmspec.errors import MMSpecError
        from mmspec.targets import adapter_for

        super().__init__(target)
        adapter_cls = adapter_for(model)
        if adapter_cls is not type(target):
            raise MMSpecError(f"drafter_kind='vlm' needs a drafter of the target's family ({target.family}); "
                              f"this drafter is {model.config.model_type!r}")
        self.adapter = adapter_cls(model, processor, target.vision_cache)
        check_same_tokenizer(target.tokenizer, self.adapter.tokenizer, target.image_token_ids)
        self.shared_vision = shares_vision(target, self.adapter)
        if self.shared_vision:
            # identical vision side: the target's cached features are the drafter's
            self.adapter.cache_namespace = target.cache_namespace
        self.model = model
        self.processor = processor
        tok = self.adapter.tokenizer
        self.rows = model.get_input_embeddings().weight.shape[0]
        out_rows = model.get_output_embeddings().weight.shape[0]
        self.bad_ids = undraftable_ids(out_rows, target.vocab_size, tok,
                                       target.image_token_ids | self.adapter.image_token_ids)
        unk = tok.unk_token_id
        self.unk_id = int(unk if unk is not None else (tok.eos_token_id or 0))

    def drafter_request(self, request: Request) -> Request:
        """The drafter's own request for the same image and prompt (its processor, its cache key)."""
        text = request.prompt_text
        if text:
            return self.adapter.prepare(request.image, text)
        # adapters that do not record the prompt text: same family and processor, so the same inputs
        return Request(prompt_ids=list(request.prompt_ids), image=request.image,
                       image_key=self.adapter.image_key(request.image), model_inputs=request.model_inputs,
                       image_token_ids=self.adapter.image_token_ids)

    def readable(self, ids: list[int]) -> list[int]:
        """Ids the drafter has no embedding row for are fed to it as unknown."""
        return [t if t < self.rows else self.unk_id for t in ids]

    def batch(self) -> VlmDraftBatch:
        return VlmDraftBatch(self)
