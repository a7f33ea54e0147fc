"""The target-adapter interface: what a VLM family's author writes against, and nothing about drafting.

An adapter turns (image, prompt) into a ``Request`` (token ids, pixel inputs, image key), computes the image
features through the shared ``vision`` cache, and gives the prompt's embeddings and positions; the engine's
``targets.batch.TargetBatch`` runs any number of such requests through the model's own decoder in one forward
per round.

``TargetAdapter`` itself is the generic family: the processor expands the image placeholders, the model's own
``get_image_features`` gives one feature row per placeholder, spliced at the placeholders, and positions are 1-D.
A family of that shape only declares its settings (``family``, ``model_types``, ``pixel_inputs``,
``config_feature_kwargs``, ``stacks_same_shape_images``); a family with its own position scheme overrides
``positions`` (Qwen2-VL's M-RoPE).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmspec.errors import MMSpecError
from vision.cache import EmbeddingCache, image_digest


@dataclass
class Request:
    """One prepared request. ``prompt_ids`` holds the image placeholders the target expects."""

    prompt_ids: list[int]
    image: Image.Image
    image_key: str
    model_inputs: dict[str, Any]          # the processor's pixel inputs (``TargetAdapter.pixel_inputs``), on CPU
    image_token_ids: frozenset[int]
    prompt_text: str = ""                 # the formatted prompt the ids came from (a drafter VLM re-processes it)
    token_types: Any = None               # [1, L] 0 text / 1 image where the processor gives them (positions)
    features: Any = None                  # filled by ``TargetAdapter.image_features``
    vision_cache_hit: bool = False

    @property
    def text_only_ids(self) -> list[int]:
        """The prompt as a text-only drafter sees it: every image placeholder removed."""
        return [t for t in self.prompt_ids if t not in self.image_token_ids]


class Positions:
    """Maps a row's logical positions [n] to what the model takes: [1, n] (1-D families) or [4, n] (M-RoPE)."""

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return p[None]


class TargetAdapter:
    """Base class of one VLM family, and the generic family itself. Subclasses set ``family`` (the name saved
    with trained drafters) and ``model_types`` (the ``config.model_type`` values they accept), and declare what
    differs from the defaults below."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    # the processor outputs that are pixel inputs: kept on the request and passed to ``get_image_features`` by
    # name (those a request has; floating ones in the model's dtype)
    pixel_inputs: tuple[str, ...] = ("pixel_values",)
    # ``model.config`` settings passed to ``get_image_features`` by name
    config_feature_kwargs: tuple[str, ...] = ()
    # several requests' pixel inputs of one shape can go through ``get_image_features`` as one stack, one feature
    # block per image out (False where a stack would mix up tiles or sizes)
    stacks_same_shape_images: bool = False
    # the image placeholder a raw prompt must hold, where the processor does not name it (``processor.image_token``)
    default_image_token: str = "<image>"

    def __init__(self, model, processor, vision_cache: EmbeddingCache):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.vision_cache = vision_cache
        # Cache keys carry this adapter's identity: the same pixels through another model are another entry.
        self.cache_namespace = f"{type(model).__name__}:{model.config._name_or_path}:{uuid.uuid4().hex[:8]}"
        self.device = model.get_input_embeddings().weight.device

    @classmethod
    def accepts(cls, model) -> bool:
        return getattr(model.config, "model_type", None) in cls.model_types

    # ----- prompt ---------------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        """One user turn with the image then the text, generation prompt added, as the model cards do.

        A prompt that already holds the processor's image token (``"<image>\nWhat is this?"``, as model cards
        write prompts) is honoured: the image goes where the token is, rendered the way the chat template renders
        an image, and no second image is added. More than one image token is refused (one image per request).
        """
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise MMSpecError("this target's processor has no chat template; pass raw_prompt=True with a prompt "
                              "that already holds the image token(s)")
        image_token = getattr(self.processor, "image_token", None)
        n = prompt.count(image_token) if isinstance(image_token, str) and image_token else 0
        if n > 1:
            raise MMSpecError(f"the prompt holds the image token {image_token!r} {n} times, but a request has one "
                              f"image; keep one (it marks where the image goes) or none (the image comes first)")
        if n == 1:
            before, after = (part.strip() for part in prompt.split(image_token))
            content = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}] \
                + ([{"type": "text", "text": after}] if after else [])
        else:
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @property
    def image_token_ids(self) -> frozenset[int]:
        """Placeholder ids that stand for image features in the prompt (never drafted)."""
        return frozenset([int(self.model.config.image_token_id)])

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def context_length(self) -> int:
        cfg = self.model.config.get_text_config()
        return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return frozenset()
        return frozenset([ids] if isinstance(ids, int) else ids)

    # generation_config settings that change greedy ``generate()`` output and that the loop does not reproduce
    UNSUPPORTED_GENERATION_SETTINGS = {"no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
                                       "min_new_tokens": None, "suppress_tokens": None,
                                       "begin_suppress_tokens": None, "forced_bos_token_id": None,
                                       "forced_eos_token_id": None, "sequence_bias": None,
                                       "exponential_decay_length_penalty": None, "num_beams": 1,
                                       "num_beam_groups": 1, "penalty_alpha": None}

    @property
    def repetition_penalty(self) -> float:
        """Applied by the loop exactly as ``generate()`` applies it (e.g. Qwen2.5-VL ships 1.05)."""
        return float(getattr(self.model.generation_config, "repetition_penalty", None) or 1.0)

    def check_generation_config(self) -> None:
        text = self.model.config.get_text_config()
        if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
            # the engine hands every layer one explicit mask (holes, trees); a sliding window needs its own
            raise MMSpecError("this target uses sliding-window attention layers, which mmspec's batched and tree "
                              "masks do not model yet; its output could differ from generate()")
        cfg = self.model.generation_config
        for name, default in self.UNSUPPORTED_GENERATION_SETTINGS.items():
            value = getattr(cfg, name, default)
            if value not in (default, None, 0, [], ()):
                raise MMSpecError(f"the target's generation_config sets {name}={value!r}, which mmspec does not "
                                  f"apply yet, so its output would differ from generate(); reset it with "
                                  f"pipe.target.generation_config.{name} = {default!r} if that is what you want")

    # ----- image --------------------------------------------------------------------------------
    def prepare(self, image: Image.Image, prompt_text: str) -> Request:
        """Run the processor: token ids with image placeholders expanded, and pixel inputs."""
        image_token = getattr(self.processor, "image_token", self.default_image_token)
        if image_token not in prompt_text:
            raise MMSpecError(f"the prompt must contain the image token {image_token!r} (raw_prompt=True passes "
                              "the prompt unchanged; leave it False to use the chat template)")
        outputs = self.processor(images=image, text=prompt_text, return_tensors="pt")
        return Request(prompt_ids=outputs["input_ids"][0].tolist(), image=image, image_key=self.image_key(image),
                       model_inputs={k: outputs[k] for k in self.pixel_inputs if k in outputs},
                       image_token_ids=self.image_token_ids, prompt_text=prompt_text,
                       token_types=outputs.get("mm_token_type_ids"))

    @torch.inference_mode()
    def encode_image(self, request: Request) -> torch.Tensor:
        """The target's projected image features for ``request`` (what its placeholders are replaced by)."""
        out = self.model.get_image_features(**self.feature_kwargs([request]), return_dict=True)
        # [n_image_tokens, hidden]: one row per placeholder, in prompt order
        return torch.cat(list(out.pooler_output), dim=0)

    @torch.inference_mode()
    def encode_images(self, requests: list[Request]) -> list | None:
        """Features of several requests in one vision forward, or None where the family encodes one at a time."""
        pixels = [r.model_inputs["pixel_values"] for r in requests]
        if not self.stacks_same_shape_images or len({tuple(p.shape) for p in pixels}) != 1:
            return None
        out = self.model.get_image_features(**self.feature_kwargs(requests), return_dict=True)
        # one [n_image_tokens, hidden] per request
        return list(out.pooler_output)

    def feature_kwargs(self, requests: list[Request]) -> dict:
        """``get_image_features``' keyword arguments for the requests' images: their ``pixel_inputs`` stacked,
        on the model's device, and the ``config_feature_kwargs`` settings."""
        kwargs = {name: getattr(self.model.config, name) for name in self.config_feature_kwargs}
        for name in self.pixel_inputs:
            if name in requests[0].model_inputs:
                value = torch.cat([r.model_inputs[name] for r in requests]).to(self.device)
                kwargs[name] = value.to(self.model.dtype) if value.is_floating_point() else value
        return kwargs

    def prompt_embeds(self, request: Request) -> torch.Tensor:
        """[1, prompt_len, hidden]: the prompt's token embeddings with the image features at the placeholders."""
        ids = torch.tensor([request.prompt_ids], device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        mask = torch.isin(ids, torch.tensor(sorted(self.feature_token_ids), device=self.device))
        n_slots, n_feats = int(mask.sum()), request.features.shape[0]
        if n_slots != n_feats:
            raise MMSpecError(f"the prompt has {n_slots} image placeholders but the image gives {n_feats} "
                              "features; use one image token per image in the prompt")
        return embeds.masked_scatter(mask[..., None], request.features.to(embeds.device, embeds.dtype))

    @property
    def feature_token_ids(self) -> frozenset[int]:
        """The placeholders the image features replace (Qwen-VL's video token is not one of them here)."""
        return self.image_token_ids

    def positions(self, request: Request) -> Positions:
        """How the row's logical positions map to the model's position ids (1-D unless overridden)."""
        return Positions()

    # ----- shared ---------------------------------------------------------------------------------
    def image_key(self, image: Image.Image) -> str:
        return f"{self.cache_namespace}/{image_digest(image)}"

    def image_features(self, request: Request) -> None:
        """Fill ``request.features`` from the vision cache, encoding the image only on a miss."""
        request.features, request.vision_cache_hit = self.vision_cache.get_or_compute(
            request.image_key, lambda: self.encode_image(request))

    def images_features(self, requests: list[Request]) -> None:
        """``image_features`` for several requests; families that can encode a stack of images at once
        (``stacks_same_shape_images``) run the misses in one vision forward."""
        misses = []
        for req in requests:
            value = self.vision_cache.get(req.image_key)
            if value is not None:
                self.vision_cache.hits += 1
                req.features, req.vision_cache_hit = value, True
            else:
                misses.append(req)
        if len(misses) > 1:
            encoded = self.encode_images(misses)
            if encoded is not None:
                for req, feats in zip(misses, encoded):
                    self.vision_cache.misses += 1
                    self.vision_cache.put(req.image_key, feats)
                    req.features, req.vision_cache_hit = feats, False
                return
        for req in misses:
            self.image_features(req)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_prompt_length(self, request: Request) -> None:
        n = len(request.prompt_ids)
        if n + 1 > self.context_length:
            raise MMSpecError(f"the prompt is {n} tokens (image placeholders included) but the target's context "
                              f"is {self.context_length}; shorten the prompt or use a smaller image",
                              code="context_length_exceeded", param="messages")
