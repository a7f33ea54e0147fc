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

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from mmspec.errors import MMSpecError
from mmspec.kv import SUPPORTED_LAYER_TYPES
from vision.cache import EmbeddingCache, image_digest, video_digest


@dataclass
class Request:
    """One prepared request. ``prompt_ids`` holds the image placeholders the target expects: 0..n images and
    0..n video clips, whose features are concatenated in placeholder order (so the splice stays one mask), cached
    per image and per clip."""

    prompt_ids: list[int]
    images: list[Image.Image]
    image_keys: list[str]                 # one vision-cache key per image
    model_inputs: dict[str, Any]          # the processor's pixel inputs (``TargetAdapter.pixel_inputs``), on CPU
    image_token_ids: frozenset[int]
    prompt_text: str = ""                 # the formatted prompt the ids came from (a drafter VLM re-processes it)
    token_types: Any = None               # [1, L] 0 text / 1 image / 2 video where the processor gives them
    features: Any = None                  # filled by ``TargetAdapter.image_features``
    vision_cache_hit: bool = False
    videos: list = field(default_factory=list)       # each clip: a list of frames, or a file path the processor reads
    video_keys: list[str] = field(default_factory=list)   # one vision-cache key per clip
    order: tuple[str, ...] = ()           # "image" / "video" per visual item in placeholder order (with videos)

    @property
    def image(self) -> Image.Image | None:
        """The first image (None for a text-only request), for callers that handle one image."""
        return self.images[0] if self.images else None

    @property
    def image_key(self) -> str:
        """One key for the whole set of images and clips ("" for none): what per-request caches beside it use."""
        return "+".join(interleave(self.order, self.image_keys, self.video_keys))

    @property
    def text_only_ids(self) -> list[int]:
        """The prompt as a text-only drafter sees it: every image placeholder removed."""
        return [t for t in self.prompt_ids if t not in self.image_token_ids]


def interleave(order, images: list, videos: list) -> list:
    """Per-image and per-clip things merged into placeholder order (``Request.order``; images alone: as given)."""
    if not videos:
        return list(images)
    items = {"image": iter(images), "video": iter(videos)}
    return [next(items[kind]) for kind in order]


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
    # one forward can score a tree (False where linear-attention layers feed the nodes through one recurrence)
    verifies_trees: bool = True
    # the image placeholder a raw prompt must hold, where the processor does not name it (``processor.image_token``)
    default_image_token: str = "<image>"
    # the processor outputs of video clips passed to ``get_video_features`` by name; none: the family takes no
    # video (a video part is refused up front)
    video_inputs: tuple[str, ...] = ()
    # processor outputs kept for the positions only (Qwen2.5-VL's ``second_per_grid_ts``)
    position_inputs: tuple[str, ...] = ()
    default_video_token: str = "<video>"
    # why a request may not hold images and video clips together (transformers' own generate() fails on the mix for
    # GLM-4V and SmolVLM), or None where it may
    no_images_with_video: str | None = None

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
    def format_prompt(self, prompt: str, n_images: int = 1) -> str:
        """One user turn with the image(s) then the text, generation prompt added, as the model cards do.

        A prompt that holds the processor's image token once per image (``"<image>\nWhat is this?"``, as model
        cards write prompts) is honoured: each image goes where its token is, rendered the way the chat template
        renders an image. Any other count of image tokens is refused.
        """
        image_token = getattr(self.processor, "image_token", None)
        n = prompt.count(image_token) if isinstance(image_token, str) and image_token and n_images else 0
        if n and n != n_images:
            raise MMSpecError(f"the prompt holds the image token {image_token!r} {n} times, but the request has "
                              f"{n_images} image(s); keep one per image (it marks where the image goes) or none "
                              "(the images come first)", code="invalid_value", param="prompt")
        if n:
            content = []
            for i, piece in enumerate(part.strip() for part in prompt.split(image_token)):
                content += ([{"type": "image"}] if i else []) + ([{"type": "text", "text": piece}] if piece else [])
        else:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        return self.render([{"role": "user", "content": content}])

    def render(self, messages: list[dict]) -> str:
        """The prompt text of a conversation (chat-template messages, images as ``{"type": "image"}`` parts): the
        target's chat template with the generation prompt added, as ``apply_chat_template`` renders it."""
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise MMSpecError("this target's processor has no chat template; pass raw_prompt=True with a prompt "
                              "that already holds the image token(s)")
        try:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:   # a template that raises on a shape it does not take (jinja's raise_exception)
            raise MMSpecError(f"the target's chat template refuses this conversation: {type(e).__name__}: {e}",
                              code="invalid_value", param="messages") from None

    @property
    def image_token_ids(self) -> frozenset[int]:
        """Placeholder ids that stand for image (and video) features in the prompt (never drafted)."""
        ids = [self.model.config.image_token_id] + ([self.video_token_id] if self.takes_video else [])
        return frozenset(int(i) for i in ids)

    @property
    def video_token_id(self) -> int | None:
        return getattr(self.model.config, "video_token_id", None)

    @property
    def video_token(self) -> str:
        return getattr(self.processor, "video_token", None) or self.default_video_token

    @property
    def takes_video(self) -> bool:
        """Whether requests may hold video clips: the family declares its video inputs, and the model and its
        processor have video (a token id, a video processor)."""
        return (bool(self.video_inputs) and self.video_token_id is not None
                and getattr(self.processor, "video_processor", None) is not None)

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
        # the slot cache puts sliding windows in the mask and rolls linear-attention states back
        # (``mmspec.kv.SlotCache``); other layer kinds (chunked attention, ...) are not modelled
        unknown = set(getattr(text, "layer_types", None) or ()) - set(SUPPORTED_LAYER_TYPES)
        if unknown:
            raise MMSpecError(f"this target has {sorted(unknown)} layers, which mmspec's caches do not model yet "
                              f"(supported: {list(SUPPORTED_LAYER_TYPES)}); its output could differ from generate()")
        cfg = self.model.generation_config
        for name, default in self.UNSUPPORTED_GENERATION_SETTINGS.items():
            value = getattr(cfg, name, default)
            if value not in (default, None, 0, [], ()):
                raise MMSpecError(f"the target's generation_config sets {name}={value!r}, which mmspec does not "
                                  f"apply yet, so its output would differ from generate(); reset it with "
                                  f"pipe.target.generation_config.{name} = {default!r} if that is what you want")

    # ----- image --------------------------------------------------------------------------------
    def prepare(self, images, prompt_text: str, videos=None) -> Request:
        """Run the processor: token ids with image placeholders expanded, and pixel inputs. ``images``: one
        ``PIL.Image``, a list of them (in placeholder order) or None; the prompt holds one image token per image.
        ``videos``: clips (each a list of frames, or a file path the processor reads), one video token each."""
        images = [] if images is None else [images] if isinstance(images, Image.Image) else list(images)
        videos = list(videos or [])
        image_token = getattr(self.processor, "image_token", self.default_image_token)
        n = prompt_text.count(image_token)
        if n != len(images):
            raise MMSpecError(f"the prompt holds the image token {image_token!r} {n} times but the request has "
                              f"{len(images)} image(s): one token per image (raw_prompt=True passes the prompt "
                              "unchanged; leave it False to use the chat template)", code="invalid_value",
                              param="prompt")
        order: tuple[str, ...] = ()
        if videos:
            if not self.takes_video:
                raise MMSpecError(f"this {self.family or 'target'} model takes no video; send the frames as images",
                                  code="unsupported_value", param="messages")
            if images and self.no_images_with_video:
                raise MMSpecError(f"this {self.family} model takes video clips or images in one request, not both: "
                                  f"{self.no_images_with_video}", code="unsupported_value", param="messages")
            tokens = {image_token: "image", self.video_token: "video"}
            pattern = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
            order = tuple(tokens[m] for m in re.findall(pattern, prompt_text))
            if order.count("video") != len(videos):
                raise MMSpecError(f"the prompt holds the video token {self.video_token!r} {order.count('video')} "
                                  f"times but the request has {len(videos)} video(s) (does the target's chat "
                                  "template render video parts?)", code="invalid_value", param="messages")
        # several images go as one sample's list, as apply_chat_template passes them (LLaVA-OneVision then skips
        # anyres patching, as generate() does); videos always so
        kwargs = {} if not images else {"images": images[0] if len(images) == 1 else [images]}
        if videos:
            kwargs["videos"] = [videos]
        try:
            outputs = self.processor(text=prompt_text, return_tensors="pt", **kwargs)
        except (ValueError, TypeError, IndexError, ImportError) as e:
            raise MMSpecError(f"the target's processor refuses this request: {e}", code="invalid_value",
                              param="messages") from None
        kept = self.pixel_inputs + (self.video_inputs + self.position_inputs if videos else ())
        return Request(prompt_ids=outputs["input_ids"][0].tolist(), images=images,
                       image_keys=[self.image_key(im) for im in images],
                       model_inputs={k: outputs[k] for k in kept if k in outputs},
                       image_token_ids=self.image_token_ids, prompt_text=prompt_text,
                       token_types=outputs.get("mm_token_type_ids"), videos=videos,
                       video_keys=[self.video_key(v) for v in videos], order=order)

    @torch.inference_mode()
    def encode_image(self, request: Request) -> torch.Tensor:
        """The target's projected image features for ``request`` (what its placeholders are replaced by)."""
        out = self.model.get_image_features(**self.feature_kwargs([request]), return_dict=True)
        # [n_image_tokens, hidden]: one row per placeholder, in prompt order
        return torch.cat(list(out.pooler_output), dim=0)

    @torch.inference_mode()
    def encode_image_blocks(self, request: Request) -> list[torch.Tensor]:
        """The features of a several-image request: one block per image in placeholder order, or one block for
        them all where the model gives one per request (Idefics3) or the family computes its own (``encode_image``
        overridden: Qwen3-VL's DeepStack columns)."""
        if type(self).encode_image is not TargetAdapter.encode_image:
            return [self.encode_image(request)]
        return list(self.model.get_image_features(**self.feature_kwargs([request]), return_dict=True).pooler_output)

    @torch.inference_mode()
    def encode_video_blocks(self, request: Request) -> list[torch.Tensor]:
        """The features of the request's video clips, one block per clip in placeholder order (the model's own
        ``get_video_features``: one row per video placeholder)."""
        return list(self.model.get_video_features(**self.video_feature_kwargs(request), return_dict=True).pooler_output)

    def video_feature_kwargs(self, request: Request) -> dict:
        """``get_video_features``' keyword arguments: the clips' ``video_inputs`` on the model's device (floating
        ones in its dtype) and the ``config_feature_kwargs`` settings."""
        kwargs = {name: getattr(self.model.config, name) for name in self.config_feature_kwargs}
        for name in self.video_inputs:
            if name in request.model_inputs:
                value = request.model_inputs[name].to(self.device)
                kwargs[name] = value.to(self.model.dtype) if value.is_floating_point() else value
        return kwargs

    @torch.inference_mode()
    def encode_images(self, requests: list[Request]) -> list | None:
        """Features of several one-image requests in one vision forward, or None where the family encodes one at
        a time."""
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
            raise MMSpecError(f"the prompt has {n_slots} image placeholders but the images give {n_feats} "
                              "features; use one image token per image in the prompt")
        if not n_feats:   # a text-only request
            return embeds
        return embeds.masked_scatter(mask[..., None], request.features.to(embeds.device, embeds.dtype))

    def spliced_features(self, features: torch.Tensor) -> torch.Tensor:
        """The columns of ``features`` that replace the placeholders' embeddings ([n, hidden]): all of them for
        most families; Qwen3-VL caches its DeepStack levels beside them and drops those here."""
        return features

    @property
    def feature_token_ids(self) -> frozenset[int]:
        """The placeholders the image features replace (Qwen-VL's video token is not one of them here)."""
        return self.image_token_ids

    def positions(self, request: Request) -> Positions:
        """How the row's logical positions map to the model's position ids (1-D unless overridden)."""
        return Positions()

    def prompt_extras(self, request: Request):
        """What the decoder needs beside the embeddings in the forward that holds the prompt (Qwen3-VL: the
        DeepStack features at the image positions), or None (most families). Read by ``prefill_kwargs``."""
        return None

    def attention_groups(self, request: Request):
        """[L] long: for each prompt position, the group of positions it also sees both ways in the prefill
        (Gemma 3: the tokens of one image), -1 for causal only; or None (most families)."""
        return None

    def prefill_kwargs(self, extras: list, kept: list[int], width: int) -> dict:
        """The decoder's keyword arguments for one prefill forward of several rows: ``extras[b]`` is row b's
        ``prompt_extras``, ``kept[b]`` how many of its prompt positions (from the start) this forward holds,
        ``width`` the padded length of the forward. Only called when some row has extras."""
        return {}

    # ----- shared ---------------------------------------------------------------------------------
    def image_key(self, image: Image.Image) -> str:
        return f"{self.cache_namespace}/{image_digest(image)}"

    def video_key(self, video) -> str:
        return f"{self.cache_namespace}/video:{video_digest(video)}"

    def cache_keys(self, request: Request) -> list[str]:
        """The vision-cache keys of the request's feature blocks: one per image (a family whose features of an
        image depend on the other images of the request tags them, see ``llava_next``)."""
        return list(request.image_keys)

    def image_features(self, request: Request) -> None:
        """Fill ``request.features`` from the vision cache, encoding only on a miss. Several images are cached
        per image; where the model gives one block for the request's images together (Idefics3), per set."""
        if request.videos:
            self._video_request_features(request)
            return
        if not request.images:
            hidden = self.model.config.get_text_config().hidden_size
            request.features = torch.zeros(0, hidden, dtype=self.model.dtype, device=self.device)
            request.vision_cache_hit = False
            return
        if len(request.images) == 1:
            request.features, request.vision_cache_hit = self.vision_cache.get_or_compute(
                self.cache_keys(request)[0], lambda: self.encode_image(request))
            return
        keys = self.cache_keys(request)
        joint = "+".join(keys)
        blocks = self.vision_cache.get(joint)
        blocks = [blocks] if blocks is not None else [self.vision_cache.get(k) for k in keys]
        if all(b is not None for b in blocks):
            self.vision_cache.hits += 1
            request.features, request.vision_cache_hit = torch.cat(blocks), True
            return
        self.vision_cache.misses += 1
        blocks = self.encode_image_blocks(request)
        if len(blocks) == len(keys):
            for key, block in zip(keys, blocks):
                self.vision_cache.put(key, block)
            request.features = torch.cat(blocks)
        else:
            request.features = torch.cat(blocks)
            self.vision_cache.put(joint, request.features)
        request.vision_cache_hit = False

    def _video_request_features(self, request: Request) -> None:
        """``image_features`` of a request with video clips: every image and every clip cached on its own; on a
        miss the request's images go through the vision tower together and so do its clips (as ``generate()``
        runs them), and the blocks are spliced in placeholder order."""
        image_keys = self.cache_keys(request) if request.images else []
        keys = interleave(request.order, image_keys, request.video_keys)
        blocks = [self.vision_cache.get(k) for k in keys]
        request.vision_cache_hit = all(b is not None for b in blocks)
        if request.vision_cache_hit:
            self.vision_cache.hits += 1
        else:
            self.vision_cache.misses += 1
            images = self.encode_image_blocks(request) if request.images else []
            videos = self.encode_video_blocks(request)
            if len(images) != len(image_keys) or len(videos) != len(request.video_keys):
                raise MMSpecError(f"{type(self).__name__} gives no feature block per image and per clip; it "
                                  "cannot take images and videos together")
            blocks = interleave(request.order, images, videos)
            for key, block in zip(keys, blocks):
                self.vision_cache.put(key, block)
        request.features = torch.cat(blocks)

    def images_features(self, requests: list[Request]) -> None:
        """``image_features`` for several requests; families that can encode a stack of images at once
        (``stacks_same_shape_images``) run the misses in one vision forward."""
        misses = []
        for req in requests:
            if len(req.images) != 1 or req.videos:   # only one-image requests go through the stack below
                self.image_features(req)
                continue
            value = self.vision_cache.get(self.cache_keys(req)[0])
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
                    self.vision_cache.put(self.cache_keys(req)[0], feats)
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
