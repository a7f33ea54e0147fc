"""The public entry points: ``load(...)`` builds a ``Pipeline``; ``generate``/``stream``/``chat`` run one request,
``generate_batch``/``submit`` many, all through the one batched engine (``mmspec.engine``).

A request is either ``(image, prompt)`` -- ``image`` one image, a list of them, or None for text only -- or a
conversation in transformers' chat-template message format (``prompt=None``; ``mmspec.conversation``), rendered
with the target's chat template exactly as ``processor.apply_chat_template(messages, add_generation_prompt=True)``
renders it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from mmspec.config import DecodeConfig
from mmspec.conversation import load_images, parse_conversation
from mmspec.drafters import drafter_class, infer_kind, tree_kinds
from mmspec.drafters.base import Drafter
from mmspec.errors import MMSpecError
from mmspec.engine import Engine, Job
# (the bundled paths and loading helpers are re-exported: callers have long imported them from here)
from mmspec.loading import (ASSETS, BUNDLED_EAGLE_DRAFTER, BUNDLED_TARGET, BUNDLED_TEXT_DRAFTER,  # noqa: F401
                            BUNDLED_VISUAL_DRAFTER, DTYPES, check_device, check_model_path, from_pretrained,
                            load_dtype)
from mmspec.policy import DraftPolicy
from mmspec.scheduler import Scheduler
from mmspec.targets import TargetAdapter, adapter_for
from mmspec.types import GenerationResult, StreamEvent
from vision.cache import EmbeddingCache


class Pipeline:
    """A target VLM, its processor, and one drafting strategy, sharing one image-embedding cache."""

    # images one request may hold (None: only the target's context limits them); the server sets --max-images
    max_images: int | None = None

    def __init__(self, adapter: TargetAdapter, strategy: Drafter):
        self.adapter = adapter
        self.strategy = strategy
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()
        # forward costs and acceptance measured so far, shared by every engine this pipeline runs
        self.policy = DraftPolicy(strategy)

    def close(self) -> None:
        """Stop the background engine thread that the first ``submit`` started (after its current round;
        requests still waiting get a last event with an error), so the pipeline and its model can be freed.
        The pipeline stays usable: ``generate`` needs no thread, and a later ``submit`` starts a new one.
        ``with mmspec.load(...) as pipe:`` closes it on leaving the block."""
        with self._scheduler_lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # the underlying HF objects, for users who need them
    @property
    def target(self):
        return self.adapter.model

    @property
    def processor(self):
        return self.adapter.processor

    @property
    def drafter(self):
        return self.strategy.model

    @property
    def drafter_kind(self) -> str:
        return self.strategy.kind

    @property
    def vision_cache(self) -> EmbeddingCache:
        return self.adapter.vision_cache

    def with_drafter_kind(self, kind: str, drafter: str | Path | None = None,
                          own_vision_cache: bool = False) -> "Pipeline":
        """This pipeline's target (the same weights, and the same image cache) with drafter kind ``kind``: the one
        way to put several drafters side by side on one target, e.g. ``"none"`` as the baseline of a comparison.
        A kind that needs weights loads them from ``drafter`` (hub id or folder) in the target's dtype.
        ``own_vision_cache=True`` gives it a separate image cache, so each side pays for encoding."""
        cls = drafter_class(kind)
        if cls.needs_weights and drafter is None:
            raise MMSpecError(f"drafter kind {kind!r} needs weights: with_drafter_kind({kind!r}, drafter=<hub id "
                              f"or folder>)")
        adapter = self.adapter
        if own_vision_cache:
            adapter = type(adapter)(adapter.model, adapter.processor, EmbeddingCache(adapter.vision_cache.max_bytes))
        return Pipeline(adapter, _make_drafter(cls, adapter, drafter, self.target.dtype))

    def generate(self, image, prompt: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, num_draft_tokens: int | None = None,
                 seed: int | None = None, raw_prompt: bool = False, tree_nodes: int | None = None) -> GenerationResult:
        """Answer ``prompt`` about ``image`` (PIL.Image, path or bytes; a list of them; or None for text only);
        the text the target alone would give. With ``prompt=None``, ``image`` is a conversation (see ``chat``).
        ``tree_nodes=N`` drafts a tree of at most N nodes per round (depth ``num_draft_tokens``, default about
        N / 2)."""
        event = None
        for event in self.stream(image, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, num_draft_tokens=num_draft_tokens, seed=seed, raw_prompt=raw_prompt,
                                 tree_nodes=tree_nodes):
            pass
        return event.result

    def chat(self, messages: list[dict], **settings) -> GenerationResult:
        """Answer a conversation in transformers' chat-template message format: ``{"role": "system"|"user"|
        "assistant", "content": str | [parts]}``, parts ``{"type": "text", "text": ...}``, ``{"type": "image",
        "image": PIL|path|bytes}`` (or ``"path"``/``"url"``/``"base64"``) and, for targets that take video,
        ``{"type": "video", "video": [frames...] | path}``; 0..n images and clips, ending on a user turn.
        The answer is what the target's ``generate()`` gives for ``processor.apply_chat_template(messages,
        add_generation_prompt=True)``. ``settings``: ``generate``'s."""
        if not isinstance(messages, (list, tuple)):
            raise MMSpecError("chat takes a conversation: a list of {role, content} messages", code="invalid_type",
                              param="messages")
        return self.generate(list(messages), None, **settings)

    def stream(self, image, prompt: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, num_draft_tokens: int | None = None, seed: int | None = None,
               raw_prompt: bool = False, tree_nodes: int | None = None) -> Iterator[StreamEvent]:
        """Like ``generate``, one ``StreamEvent`` per round; the last has ``done=True`` and the ``result``.

        Everything is validated before the first event, so a bad request raises ``MMSpecError`` right away.
        """
        job = self._job(image, prompt, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            num_draft_tokens=num_draft_tokens, seed=seed, tree_nodes=tree_nodes),
                        raw_prompt)
        return self._stream_one(job)

    @torch.inference_mode()  # on a generator function torch applies it to each step, not to the caller
    def _stream_one(self, job: Job) -> Iterator[StreamEvent]:
        engine = Engine(self.adapter, self.strategy, max_batch=1, policy=self.policy)
        engine.add(job)
        for _, event in engine.run():
            if job.error is not None:
                raise MMSpecError(job.error)
            yield event

    def _job(self, image, prompt, settings: dict, raw_prompt: bool = False) -> Job:
        """Validate one input and prepare its request (raises ``MMSpecError`` on bad input): ``(image, prompt)``,
        or a conversation in ``image`` when ``prompt`` is None."""
        config = self.decode_config(settings)
        start = time.perf_counter()
        self.adapter.check_generation_config()
        if prompt is None:
            if not isinstance(image, (list, tuple)) or (image and not any(isinstance(m, dict) for m in image)):
                raise MMSpecError("no prompt: give a prompt, or a conversation (a list of {role, content} messages) "
                                  "in its place", code="invalid_value", param="prompt")
            messages, images, videos = parse_conversation(image, self.max_images, self.adapter.takes_video,
                                                          f"the {self.target.config.model_type} target")
            text = self.adapter.render(messages)
        else:
            if not isinstance(prompt, str) or not prompt.strip():
                raise MMSpecError("the prompt is empty; ask something about the image, e.g. 'Describe the image.'",
                                  code="invalid_value", param="prompt")
            images, videos = load_images(image, self.max_images), []
            text = prompt if raw_prompt else self.adapter.format_prompt(prompt, len(images))
        request = self.adapter.prepare(images, text, videos)
        self.adapter.check_prompt_length(request)
        return Job(request=request, config=config, start=start)

    def decode_config(self, settings: dict) -> DecodeConfig:
        """The validated settings of one request on this pipeline (``MMSpecError`` for bad values)."""
        config = DecodeConfig(**settings)
        if config.tree_nodes is not None and not self.strategy.grows_trees:
            raise MMSpecError(f"drafter kind {self.strategy.kind!r} does not draft trees; tree_nodes works with "
                              f"{tree_kinds()} (or leave tree_nodes=None for a chain)")
        models = [self.adapter] + [a for a in [getattr(self.strategy, "adapter", None)] if a is not None]
        if config.tree_nodes is not None and not all(getattr(a, "verifies_trees", True) for a in models):
            raise MMSpecError("this model has linear-attention (recurrent) layers, which cannot verify or draft a "
                              "tree in one forward; use a chain (tree_nodes=None)", code="invalid_value",
                              param="tree_nodes")
        return config

    def generate_batch(self, images, prompts=None, batch_size: int | None = None, max_new_tokens: int = 64,
                       temperature: float = 0.0, top_p: float = 1.0, num_draft_tokens: int | None = None,
                       seed: int | None = None, raw_prompt: bool = False, tree_nodes: int | None = None,
                       progress=None) -> list[GenerationResult]:
        """One ``GenerationResult`` per (image, prompt), in order (each image: one, a list, or None; a row whose
        prompt is None -- every row when ``prompts`` is None -- is a conversation, as ``chat`` takes it), with at
        most ``batch_size`` rows in flight (continuous batching: a finished row leaves and the next input joins at
        once). ``prompts`` may be one string for every image. A bad input (unreadable image, empty or too long prompt) gets a result whose
        ``error`` says why; the others finish. Each row's output is the one ``generate`` gives for it.
        ``seed`` seeds row i with ``seed + i``. ``progress(i, result)`` is called as each input finishes (in the
        order they finish, so ``i`` says which input it was), e.g. to write results out as they come."""
        images = list(images)
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts] * len(images)
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise MMSpecError(f"generate_batch got {len(images)} images but {len(prompts)} prompts")
        batch_size = self.default_batch_size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MMSpecError(f"batch_size must be a positive integer, got {batch_size!r}")
        settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        num_draft_tokens=num_draft_tokens, seed=seed, tree_nodes=tree_nodes)
        self.decode_config(settings)  # bad settings are the caller's error, not one row's
        jobs = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            row_settings = dict(settings, seed=None if seed is None else seed + i)
            try:
                job = self._job(image, prompt, row_settings, raw_prompt)
            except MMSpecError as e:
                job = Job(request=None, config=DecodeConfig(**row_settings), error=str(e))
            job.index = i
            jobs.append(job)
        with torch.inference_mode():
            engine = Engine(self.adapter, self.strategy, max_batch=batch_size, policy=self.policy)
            for job in jobs:
                engine.add(job)
            for job, event in engine.run():
                if event.done and progress is not None:
                    progress(job.index, job.result)
        return [job.result for job in jobs]

    # rows in flight when the caller does not say: what measured fastest on the bundled pair (docs/BENCHMARKS.md)
    default_batch_size = 16

    def submit(self, image, prompt: str | None = None, raw_prompt: bool = False, **settings) -> Job:
        """Queue a request on this pipeline's shared batched engine (a background thread; safe to call from any
        thread) and return its ``Job`` at once: ``mmspec.scheduler.iter_job_events(job)`` yields its events as
        rounds finish; ``job.cancelled = True`` frees its row. Bad input raises ``MMSpecError`` here. A
        conversation goes in ``image`` with ``prompt=None``."""
        job = self._job(image, prompt, settings, raw_prompt)
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.adapter, self.strategy, self.default_batch_size, self.policy)
        return self._scheduler.submit(job)


def load(target: str | Path | None = None, drafter: str | Path | None = "default", drafter_kind: str | None = None,
         device: str = "cpu", dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
         trust_remote_code: bool = False, preset: str | None = None, vision_cache: EmbeddingCache | None = None,
         vision_cache_bytes: int = 512 * 2**20) -> Pipeline:
    """Load a target VLM (hub id or folder) and a drafter into a ``Pipeline``.

    With no arguments: the bundled default pair (offline, CPU). ``preset`` names a known real pair (see
    ``mmspec.presets.PRESETS``); explicit arguments override it. ``drafter_kind`` is one of
    ``mmspec.drafters.DRAFTER_KINDS``; it defaults to "text" when a drafter model is given and "ngram" otherwise.
    ``device_map="auto"`` spreads a target larger than one device with accelerate.
    """
    if preset is not None:
        from mmspec.presets import resolve_preset

        p = resolve_preset(preset)
        target = target or p.target
        drafter = p.drafter if drafter == "default" else drafter
        drafter_kind = drafter_kind or p.drafter_kind
    bundled = target is None
    if bundled:
        target = BUNDLED_TARGET
        if drafter == "default" and drafter_kind is None:
            drafter_kind = "eagle"   # the bundled pair's fastest drafter (docs/BENCHMARKS.md)
    if drafter == "default":
        # (a kind that takes settings, not weights, finds its own default: layerskip's tuned skip set)
        if bundled and not getattr(drafter_class(drafter_kind), "takes_settings", False):
            drafter = {"visual": BUNDLED_VISUAL_DRAFTER, "eagle": BUNDLED_EAGLE_DRAFTER}.get(drafter_kind,
                                                                                        BUNDLED_TEXT_DRAFTER)
        else:
            drafter = None
    drafter_kind = infer_kind(drafter, drafter_kind)   # a drafter folder's own config names its kind (EAGLE-3)
    if drafter_kind is None:
        drafter_kind = "text" if drafter is not None else "ngram"
    cls = drafter_class(drafter_kind)
    if cls.needs_weights and drafter is None:
        raise MMSpecError(f"drafter_kind={drafter_kind!r} needs a drafter model (drafter=<hub id or folder>)")
    torch_dtype = load_dtype(dtype, device, preset)
    if device_map is None:
        device = check_device(device)
    check_model_path("target", target)
    if cls.needs_weights:
        check_model_path("drafter", drafter)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_kwargs = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    model = from_pretrained(AutoModelForImageTextToText, "target", target, **model_kwargs)
    if device_map is None:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as e:  # out of memory, a driver error
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MMSpecError(f"cannot put the target on {device!r}: {first}") from e
    model.eval()
    processor = from_pretrained(AutoProcessor, "target processor", target, trust_remote_code=trust_remote_code)
    adapter = adapter_for(model)(model, processor, vision_cache or EmbeddingCache(vision_cache_bytes))
    return Pipeline(adapter, _make_drafter(cls, adapter, drafter, torch_dtype, trust_remote_code))


def _make_drafter(cls: type[Drafter], adapter: TargetAdapter, drafter, dtype: torch.dtype,
                  trust_remote_code: bool = False) -> Drafter:
    """A drafter of class ``cls`` for ``adapter``'s target: its weights from ``drafter`` when it needs them."""
    if cls.needs_weights:
        return cls.from_pretrained(adapter, drafter, dtype, trust_remote_code=trust_remote_code)
    if getattr(cls, "takes_settings", False):   # weightless, tuned per target: ``drafter`` names its settings
        return cls(adapter, drafter)
    return cls(adapter)
