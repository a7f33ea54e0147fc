"""What answers a validated chat request: the engine side of the server.

``LocalBackend`` wraps one pipeline: it loads the request's images (0..n, in order), puts them into the
conversation's image parts and submits the conversation to the pipeline's shared engine (which renders it with
the target's chat template, as ``pipe.chat`` does) (one continuous batch) and turns the engine's rounds into
*pieces*, plain dicts that cross a process boundary unchanged (``mmspec.server.replicas`` runs one
``LocalBackend`` per Ray Serve replica and streams its pieces to the ingress):

```
{"delta": str,              # answer text that is now safe to send (stop strings cut, partial characters held)
 "done": bool,
 "spec": [drafts, draft_tokens, accepted_tokens, [accepted at position 0, 1, ...]],   # rounds since last piece
 "replica": {"id", "rows", "queued", "peak_host_bytes", "peak_device_bytes"},        # first and last piece
 # the last piece (done) only:
 "finish": "stop" | "length", "text": the whole answer, "usage": {...}, "mmspec": {...}}
```

The first piece comes after the first round (so an engine refusal is still an HTTP error); later pieces only
when they carry text, and the last one always. An ``APIError`` is raised for a request that cannot be answered.
Closing the generator early (client gone, timeout) cancels the job: its row leaves the batch at the next round.
"""

from __future__ import annotations

import os
import queue
import resource
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool

from mmspec.errors import MMSpecError
from mmspec.server.config import ServerConfig
from mmspec.server.images import request_image, request_video
from mmspec.server.protocol import (APIError, AnswerText, ChatRequest, bad_request, check_frames, finish_reason,
                                    refused, tokens_through_stop)

BUNDLED_MODEL_ID = "mmspec-bundled"
POLL_S = 0.25                     # how often a thread waiting on engine events wakes up (to notice cancellation)
# transformers warns once per tokenizer about a prompt over model_max_length; the engine's own check says more
LONG_PROMPT_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def served_model_id(pipe) -> str:
    """The id clients name: ``mmspec-bundled`` for the bundled pair, a local target's folder name, or its hub id."""
    from mmspec.pipeline import BUNDLED_TARGET

    name = str(getattr(pipe.target.config, "_name_or_path", "") or getattr(pipe.target, "name_or_path", ""))
    if name and os.path.isdir(name):
        path = Path(name).resolve()
        return BUNDLED_MODEL_ID if path == BUNDLED_TARGET.resolve() else path.name
    return name or "mmspec"


def sampling_defaults(pipe) -> dict:
    """What a request that does not say gets: the target's generation_config sampling (greedy when it does not
    sample, as for the bundled pair and llava-1.5), and answers up to the context's end."""
    cfg = pipe.target.generation_config
    out = {"max_new_tokens": int(pipe.adapter.context_length), "temperature": 0.0, "top_p": 1.0}
    if getattr(cfg, "do_sample", False):
        out["temperature"] = float(getattr(cfg, "temperature", None) or 1.0)
        out["top_p"] = float(getattr(cfg, "top_p", None) or 1.0)
    return out


def model_card(pipe) -> dict:
    """What the HTTP side needs to know of the pipeline (plain data: with replicas it travels to the ingress)."""
    name = served_model_id(pipe)
    alias = str(getattr(pipe.target.config, "_name_or_path", "") or name)
    return {"model_id": name, "aliases": sorted({alias} - {name}), "drafter_kind": pipe.drafter_kind,
            "image_token": getattr(pipe.processor, "image_token", None), "defaults": sampling_defaults(pipe),
            "takes_video": bool(pipe.adapter.takes_video),
            "device": str(pipe.adapter.device), "batch_size": int(pipe.default_batch_size)}


def stats_extra(stats, drafter_kind: str) -> dict:
    """mmspec's extra response field: how the answer was made."""
    return {"drafter_kind": drafter_kind, "target_forwards": stats.target_forwards,
            "draft_forwards": stats.draft_forwards, "drafted_tokens": stats.drafted_tokens,
            "accepted_tokens": stats.accepted_tokens, "mean_accepted": round(stats.mean_accepted, 4),
            "acceptance_rate": round(stats.acceptance_rate, 4), "wall_s": round(stats.wall_s, 4),
            "time_to_first_token_s": round(stats.time_to_first_token_s, 4),
            "vision_cache_hit": stats.vision_cache_hit}


def quiet_long_prompt_warnings(pipe) -> None:
    """Mark transformers' one-time "sequence length is longer than ... (600 > 512)" warning as given for the
    pipeline's tokenizers: a too-long prompt then gets the engine's own error (context_length_exceeded) alone."""
    holders = [pipe.processor, getattr(pipe.processor, "tokenizer", None), getattr(pipe.adapter, "tokenizer", None),
               getattr(pipe.strategy, "tokenizer", None)]
    for tok in holders:
        flags = getattr(tok, "deprecation_warnings", None)
        if isinstance(flags, dict):
            flags[LONG_PROMPT_WARNING] = True


class SpecFigures:
    """A request's speculative figures as vLLM counts them: drafts (rounds that drafted), draft tokens, accepted
    tokens and accepted tokens per draft position; ``take`` returns what was added since the last ``take``."""

    def __init__(self):
        self.drafts = self.draft_tokens = self.accepted = 0
        self.per_position: list[int] = []
        self._taken = (0, 0, 0, [])

    def add(self, rnd) -> None:
        k = len(rnd.draft_ids)
        if not k:
            return
        self.drafts += 1
        self.draft_tokens += k
        self.accepted += rnd.n_accepted
        self.per_position.extend([0] * (rnd.n_accepted - len(self.per_position)))
        for i in range(rnd.n_accepted):
            self.per_position[i] += 1

    def take(self) -> list:
        d, t, a, pos = self._taken
        out = [self.drafts - d, self.draft_tokens - t, self.accepted - a,
               [n - (pos[i] if i < len(pos) else 0) for i, n in enumerate(self.per_position)]]
        self._taken = (self.drafts, self.draft_tokens, self.accepted, list(self.per_position))
        return out


def peak_memory() -> dict:
    """This process's peak resident memory and, on CUDA, the peak memory torch allocated."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    device = 0
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = int(torch.cuda.max_memory_allocated())
    except Exception:  # no torch build with CUDA, or no device: host memory only
        pass
    return {"peak_host_bytes": int(host), "peak_device_bytes": device}


def _failed(result) -> APIError:
    """The error of a request the engine failed while running it."""
    message = result.error or "the request failed"
    # the engine keeps only "<exception type>: <message>", so the type is read back from the text
    if message.startswith("MMSpecError: "):
        return bad_request(message[len("MMSpecError: "):], None, "invalid_value")
    return APIError(500, f"the engine failed on this request: {message}", None, None, "server_error")


class LocalBackend:
    """A pipeline answering requests in this process (see the module docstring for the pieces it yields)."""

    replica_count = 1

    def __init__(self, pipe, config: ServerConfig | None = None, replica_id: str = "local"):
        self.pipe = pipe
        self.config = config or ServerConfig()
        self.replica_id = replica_id
        self.card = model_card(pipe)
        self.limiter: Any = None   # anyio.CapacityLimiter for the threads that wait on engine events
        quiet_long_prompt_warnings(pipe)

    @property
    def capacity(self) -> int:
        """Rows the engine keeps in flight at most."""
        return int(self.pipe.default_batch_size)

    def engine(self):
        scheduler = getattr(self.pipe, "_scheduler", None)   # started by the first submit
        return scheduler.engine if scheduler is not None else None

    def snapshot(self) -> dict:
        """The engine's load now and this process's peak memory."""
        engine = self.engine()
        return {"id": self.replica_id, "rows": len(engine.active) if engine else 0,
                "queued": len(engine.queue) if engine else 0, **peak_memory()}

    def replicas(self) -> list[dict]:
        return [self.snapshot()]

    def load_images(self, chat: ChatRequest) -> list[dict]:
        """The request's messages with each image part holding its decoded image and each video part its frames
        (a bad one: its part's 400; more frames than ``--max-images`` allows: a 400 too)."""
        images = [request_image(url, self.config, where) for where, url in chat.images]
        videos = [request_video(url, self.config, where) for where, url in chat.videos]
        check_frames(len(images), [len(v) for v in videos], self.config.max_images)
        found = {"image": iter(images), "video": iter(videos)}
        return [dict(m, content=[dict(p, **{p["type"]: next(found[p["type"]])}) if p["type"] in found else p
                                 for p in m["content"]]) for m in chat.messages]

    def submit(self, messages: list[dict], settings: dict):
        try:
            return self.pipe.submit(messages, **settings)
        except MMSpecError as e:
            raise refused(e) from None

    async def next_event(self, job):
        """The job's next engine event (waited for on a worker thread); a failed request raises its ``APIError``."""
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(4096)
        while True:
            try:
                event = await anyio.to_thread.run_sync(job.events.get, True, POLL_S, abandon_on_cancel=True,
                                                       limiter=self.limiter)
            except queue.Empty:
                continue
            if event.done and event.result.error:
                raise _failed(event.result)
            return event

    async def answer(self, chat: ChatRequest) -> AsyncIterator[dict]:
        messages = await run_in_threadpool(self.load_images, chat)
        job = await run_in_threadpool(self.submit, messages, chat.settings)
        text, spec, first = AnswerText(chat.stops), SpecFigures(), True
        try:
            while True:
                event = await self.next_event(job)
                spec.add(event.round)
                delta = text.update(event.text, event.done)
                if text.stopped:
                    job.cancelled = True   # cut at a stop string: the row leaves the batch at the next round
                if event.done or text.stopped:
                    yield self._last_piece(job, event, text, chat, spec, delta)
                    return
                if delta or first:
                    piece = {"delta": delta, "done": False, "spec": spec.take()}
                    if first:
                        piece["replica"] = self.snapshot()
                    first = False
                    yield piece
        finally:
            if not job.done:
                job.cancelled = True       # closed early (client gone, timeout): free the row

    def _last_piece(self, job, event, text: AnswerText, chat: ChatRequest, spec: SpecFigures, delta: str) -> dict:
        if text.stopped:
            completion = tokens_through_stop(self.pipe.adapter.decode, event.token_ids, chat.stops)
        else:
            completion = len(event.token_ids)
        prompt_tokens = len(job.request.prompt_ids)
        extra = stats_extra(event.stats, self.pipe.drafter_kind)
        extra.update(drafts=spec.drafts, accepted_per_position=list(spec.per_position), replica=self.replica_id)
        return {"delta": delta, "done": True, "spec": spec.take(), "replica": self.snapshot(),
                "finish": finish_reason(event.stats.stop_reason, text.stopped), "text": text.final,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}, "mmspec": extra}
