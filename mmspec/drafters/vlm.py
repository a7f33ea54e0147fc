"""``drafter_kind="vlm"``: a smaller VLM of the target's family drafts while seeing the image.

The drafter runs through its own target adapter (``adapter_for(model)``), so it gets the same prompt handling,
image features and positions (M-RoPE for Qwen-VL, image packing for LLaVA-NeXT, tiles for Idefics3) as that
family's target does. Its adapter shares the target's vision cache: when its vision side (vision tower, projector,
image processor) is the target's -- same config and identical tensors -- it reads the target's cached features;
otherwise its own features are cached under its own key, so a second request with the same image is a hit.

The tokenizer must be the target's (``check_same_tokenizer``); padded vocabularies on either side work: ids the
drafter has no row for get draft probability 0 and are fed to it as unknown.

A row whose prompt is longer than the drafter's context (a smaller VLM often has a shorter one) still gets the
target's answer: it drafts nothing, and a row that outgrows the drafter's context stops drafting there.

Trees (``tree_nodes``) grow as the text drafter's do: nodes fed depth by depth over several forwards of the drafter
VLM (``TargetBatch.forward_nodes``), each seeing the row's committed slots and its own fed ancestors, at positions by
depth through the drafter's own ``Positions`` (M-RoPE for Qwen-VL); the nodes are dropped after the round.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmspec.drafters.base import RowSpec
from mmspec.drafters.model_batch import FedTokens, ModelDraftBatch, ModelDrafter
from mmspec.targets.base import Request, TargetAdapter
from mmspec.targets.batch import TargetBatch

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
    """The image and video processors' settings (what turns pixels into the vision tower's input)."""
    out = {}
    for name in ("image_processor", "video_processor"):
        ip = getattr(processor, name, None)
        if ip is not None:
            out[name] = {k: v for k, v in ip.to_dict().items() if not k.startswith("_")}
    return out


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


class VlmDraftBatch(ModelDraftBatch):
    """Drafting through the drafter VLM's own ``TargetBatch`` (its KV slots, positions and prefills)."""

    def __init__(self, drafter: "VlmDrafter"):
        self.sess = TargetBatch(drafter.adapter)
        super().__init__(drafter, self.sess.main)

    def _open(self, row, spec: RowSpec) -> FedTokens:
        dreq = self.drafter.drafter_request(spec.request)
        if len(dreq.prompt_ids) >= self.drafter.context_length:
            # the prompt fits the target's context but not the drafter's: the row never drafts (``_room`` <= 0)
            # and gets the target's own tokens, so the drafter neither encodes its images nor caches its prompt
            return FedTokens([], len(dreq.prompt_ids))
        self.drafter.adapter.image_features(dreq)
        self.sess.add(row, dreq)
        # the session holds the prompt but its last position, which is fed first (the target's pending token)
        return FedTokens([dreq.prompt_ids[-1]], len(dreq.prompt_ids))

    def remove(self, rows) -> None:
        super().remove(rows)
        self.sess.remove(rows)

    def _catch_up(self, rows: list) -> dict:
        """The drafting rows' waiting ids in one ``verify`` of the session (which prefills joining rows)."""
        in_cache = set(self.slots.rows)
        # every row already in the drafter's cache takes part (rows not drafting feed nothing)
        ids = {r: torch.as_tensor(self.state[r].ids if r in rows else [], dtype=torch.long, device=self.device)
               for r in set(rows) | in_cache}
        logits = self.sess.verify(ids)
        self.sess.commit({r: range(len(v)) for r, v in ids.items()})
        for r in rows:
            self.state[r].ids = []
        self.fresh.difference_update(rows)
        return {r: logits[r][-1] for r in rows}

    def _inputs(self, ids: torch.Tensor, prev) -> torch.Tensor:
        return ids

    def _model(self, slots, x: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        return self.sess.forward_nodes(x, parents, **tree)


class VlmDrafter(ModelDrafter):
    kind = "vlm"
    default_k = 4
    auto_classes = (AutoModelForImageTextToText, AutoProcessor)

    def __init__(self, target: TargetAdapter, model, processor):
        from mmspec.errors import MMSpecError
        from mmspec.targets import adapter_for

        adapter_cls = adapter_for(model)
        if adapter_cls is not type(target):
            raise MMSpecError(f"drafter_kind='vlm' needs a drafter of the target's family ({target.family}); "
                              f"this drafter is {model.config.model_type!r}")
        self.adapter = adapter_cls(model, processor, target.vision_cache)
        super().__init__(target, model, self.adapter.tokenizer, target.image_token_ids | self.adapter.image_token_ids)
        self.context_length = self.adapter.context_length
        self.shared_vision = shares_vision(target, self.adapter)
        if self.shared_vision:
            # identical vision side: the target's cached features are the drafter's
            self.adapter.cache_namespace = target.cache_namespace
        self.processor = processor

    def drafter_request(self, request: Request) -> Request:
        """The drafter's own request for the same images, clips and prompt (its processor, its cache keys)."""
        text = request.prompt_text
        if text:
            return self.adapter.prepare(request.images, text, request.videos)
        # adapters that do not record the prompt text: same family and processor, so the same inputs
        return Request(prompt_ids=list(request.prompt_ids), images=list(request.images),
                       image_keys=[self.adapter.image_key(im) for im in request.images],
                       model_inputs=request.model_inputs, image_token_ids=self.adapter.image_token_ids,
                       token_types=request.token_types, videos=list(request.videos),
                       video_keys=[self.adapter.video_key(v) for v in request.videos], order=request.order)

    def batch(self) -> VlmDraftBatch:
        return VlmDraftBatch(self)
