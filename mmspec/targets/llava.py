"""LLaVA (``LlavaForConditionalGeneration``): a fixed number of image placeholders, 1-D positions.

Image features are spliced into the prompt embeddings by a mask over placeholder positions, the same way the
model's own forward does it, so pixels reach the vision tower once per image (through the vision cache).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from mmspec.errors import MMSpecError
from mmspec.kv import CACHE_KW, rollback
from mmspec.targets.base import Request, TargetAdapter, TargetSession


class SplicedEmbeddingSession(TargetSession):
    """A target session for models that take ``inputs_embeds``. Positions come from ``positions(start, n)``:
    ``None`` (the default) lets the model number them from the cache length; families with their own scheme
    (Qwen2-VL's M-RoPE) override it."""

    def __init__(self, model, prompt_embeds: torch.Tensor):
        # prompt_embeds: [1, prompt_len, hidden]
        self.model = model
        self.embed = model.get_input_embeddings()
        self.cache = DynamicCache(config=model.config.get_text_config())
        # The prefill waits for the first ``forward``, which runs the whole prompt and the ids after its last
        # position in ONE call: round 1's drafts are verified by the prefill itself. Until then ``length``
        # counts the prompt's last position as pending (the loop feeds its id first; its embedding, which may
        # be an image feature, is taken from here).
        self._prompt: torch.Tensor | None = prompt_embeds

    def positions(self, start: int, n: int) -> torch.Tensor | None:
        return None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [n] -> embeds [1, n, hidden]
        embeds = self.embed(ids.to(self.embed.weight.device)[None])
        start, n = self.length, ids.shape[0]
        if self._prompt is not None:
            embeds = torch.cat([self._prompt.to(embeds.dtype), embeds[:, 1:]], dim=1)
            start, self._prompt = 0, None
        out = self.model(inputs_embeds=embeds, position_ids=self.positions(start, embeds.shape[1]), use_cache=True,
                         logits_to_keep=n, **{CACHE_KW: self.cache})
        # [n, vocab]
        return out.logits[0].float()

    def rollback(self, length: int) -> None:
        if self._prompt is not None:
            if length >= self.length:
                return
            prompt, self._prompt = self._prompt, None  # keep the first ``length`` prompt positions, run them now
            if length > 0:
                self.model(inputs_embeds=prompt[:, :length], position_ids=self.positions(0, length),
                           use_cache=True, logits_to_keep=1, **{CACHE_KW: self.cache})
            return
        rollback(self.cache, length)

    @property
    def length(self) -> int:
        # before the first forward: the prompt but its last position (the loop's pending token)
        return self._prompt.shape[1] - 1 if self._prompt is not None else self.cache.get_seq_length()


class LlavaAdapter(TargetAdapter):
    family = "llava"
    model_types = ("llava",)

    @property
    def image_token_ids(self) -> frozenset[int]:
        return frozenset([int(self.model.config.image_token_id)])

    def prepare(self, image, prompt_text: str) -> Request:
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token not in prompt_text:
            raise MMSpecError(f"the prompt must contain the image token {image_token!r} (raw_prompt=True passes "
                              "the prompt unchanged; leave it False to use the chat template)")
        inputs = self.processor(images=image, text=prompt_text, return_tensors="pt")
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        return Request(prompt_ids=ids, image=image, image_key=self.image_key(image), model_inputs=dict(inputs),
                       image_token_ids=self.image_token_ids)

    @torch.inference_mode()
    def encode_image(self, request: Request) -> torch.Tensor:
        pixel_values = request.model_inputs["pixel_values"].to(self.device, self.model.dtype)
        out = self.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        # [n_image_tokens, hidden]
        return torch.cat(list(out.pooler_output), dim=0)

    def prompt_embeds(self, request: Request) -> torch.Tensor:
        ids = torch.tensor([request.prompt_ids], device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        mask = torch.isin(ids, torch.tensor(sorted(self.image_token_ids), device=self.device))
        n_slots, n_feats = int(mask.sum()), request.features.shape[0]
        if n_slots != n_feats:
            raise MMSpecError(f"the prompt has {n_slots} image placeholders but the image gives {n_feats} "
                              "features; use one image token per image in the prompt")
        # [1, prompt_len, hidden]
        return embeds.masked_scatter(mask[..., None], request.features.to(embeds.dtype))

    @torch.inference_mode()
    def session(self, request: Request) -> TargetSession:
        return SplicedEmbeddingSession(self.model, self.prompt_embeds(request))
