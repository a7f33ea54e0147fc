"""The target-adapter interface: everything the loop needs from a VLM family, and nothing about drafting.

An adapter turns (image, prompt) into a ``Request`` (token ids, pixel inputs, image key), computes the image
features through the shared ``vision`` cache, and opens a ``TargetSession`` that owns one request's KV cache:
``forward(ids)`` appends positions and returns their logits, ``rollback(length)`` moves the cache back.
Families with variable image-token counts or their own position scheme override ``prepare``/``session``.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
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
    model_inputs: dict[str, Any]          # processor output (pixel_values, image_sizes, ...), on CPU
    image_token_ids: frozenset[int]
    features: Any = None                  # filled by ``TargetAdapter.image_features``
    vision_cache_hit: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def text_only_ids(self) -> list[int]:
        """The prompt as a text-only drafter sees it: every image placeholder removed."""
        return [t for t in self.prompt_ids if t not in self.image_token_ids]


class TargetSession(ABC):
    """One request's state in the target: the KV cache and the number of positions it holds."""

    @abstractmethod
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [n] new positions after the cache -> logits [n, vocab] (float32, target's vocab)."""

    @abstractmethod
    def rollback(self, length: int) -> None:
        """Keep only the first ``length`` positions of the cache."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Positions currently in the cache."""


class TargetAdapter(ABC):
    """Base class of one VLM family. Subclasses set ``family`` and list the HF classes they accept."""

    family: str = ""
    model_types: tuple[str, ...] = ()

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
        """One user turn with the image then the text, generation prompt added, as the model cards do."""
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise MMSpecError("this target's processor has no chat template; pass raw_prompt=True with a prompt "
                              "that already holds the image token(s)")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @property
    @abstractmethod
    def image_token_ids(self) -> frozenset[int]:
        """Placeholder ids that stand for image features in the prompt (never drafted)."""

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
                                       "exponential_decay_length_penalty": None}

    @property
    def repetition_penalty(self) -> float:
        """Applied by the loop exactly as ``generate()`` applies it (e.g. Qwen2.5-VL ships 1.05)."""
        return float(getattr(self.model.generation_config, "repetition_penalty", None) or 1.0)

    def check_generation_config(self) -> None:
        cfg = self.model.generation_config
        for name, default in self.UNSUPPORTED_GENERATION_SETTINGS.items():
            value = getattr(cfg, name, default)
            if value not in (default, None, 0, [], ()):
                raise MMSpecError(f"the target's generation_config sets {name}={value!r}, which mmspec does not "
                                  f"apply yet, so its output would differ from generate(); reset it with "
                                  f"pipe.target.generation_config.{name} = {default!r} if that is what you want")

    @abstractmethod
    def prepare(self, image: Image.Image, prompt_text: str) -> Request:
        """Run the processor: token ids with image placeholders expanded, and pixel inputs."""

    @abstractmethod
    def encode_image(self, request: Request) -> Any:
        """The target's projected image features for ``request`` (what its placeholders are replaced by)."""

    @abstractmethod
    def session(self, request: Request) -> TargetSession:
        """Open a session whose ``length`` is every prompt position but the last (the loop's pending token).

        A session may defer the prefill to the first ``forward`` and run the prompt and the new ids in one call
        (``SplicedEmbeddingSession`` does); callers see the same logits either way."""

    # ----- shared ---------------------------------------------------------------------------------
    def image_key(self, image: Image.Image) -> str:
        return f"{self.cache_namespace}/{image_digest(image)}"

    def image_features(self, request: Request) -> None:
        """Fill ``request.features`` from the vision cache, encoding the image only on a miss."""
        request.features, request.vision_cache_hit = self.vision_cache.get_or_compute(
            request.image_key, lambda: self.encode_image(request))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_prompt_length(self, request: Request) -> None:
        n = len(request.prompt_ids)
        if n + 1 > self.context_length:
            raise MMSpecError(f"the prompt is {n} tokens (image placeholders included) but the target's context "
                              f"is {self.context_length}; shorten the prompt or use a smaller image")
