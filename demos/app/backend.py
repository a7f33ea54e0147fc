"""The demo's backend: the loaded pipeline and, on the same target, one per weightless drafter kind, and the
handlers: ``DemoBackend.generate`` answers one request (an image or none, and a prompt), ``DemoBackend.chat`` one
turn of a conversation (follow-up questions about the same image(s), a new image added to a turn, or text only).
Each request runs on the shared batched engine of its drafter kind's pipeline; the token view is per answer."""

from __future__ import annotations

import logging
import queue
import threading
from contextlib import closing
from typing import TYPE_CHECKING, Iterator

from demos.app.render import TokenRenderer, conversation_html, error_html, stats_html
from mmspec.drafters import weightless_kinds
from mmspec.errors import MMSpecError
from mmspec.types import StreamEvent

if TYPE_CHECKING:
    from mmspec.pipeline import Pipeline

log = logging.getLogger("mmspec.demo")

ROUND_TIMEOUT_S = 600.0   # a request whose next round takes longer than this is given up
MAX_NEW_TOKENS_LIMIT = 512


class DemoBackend:
    """Holds the loaded pipeline and, sharing its target adapter (weights, vision cache), one extra pipeline per
    weightless drafter kind. ``generate`` is the handler the Generate button calls."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.pipelines: dict[str, Pipeline] = {pipe.drafter_kind: pipe}
        self._lock = threading.Lock()
        # an answer cannot run past the target's context (the page's slider stops there too)
        self.max_new_tokens_limit = max(1, min(MAX_NEW_TOKENS_LIMIT, int(pipe.adapter.context_length)))

    @property
    def kinds(self) -> list[str]:
        """The drafter kinds the page offers: the loaded one, then every weightless kind."""
        return list(dict.fromkeys([self.pipe.drafter_kind, *weightless_kinds()]))

    def pipeline(self, kind: str) -> Pipeline:
        """The pipeline of drafter ``kind`` on the loaded target, made on first use."""
        if kind not in self.kinds:
            raise MMSpecError(f"unknown drafter kind {kind!r}; this model pair offers {self.kinds}")
        with self._lock:
            if kind not in self.pipelines:
                self.pipelines[kind] = self.pipe.with_drafter_kind(kind)
            return self.pipelines[kind]

    def _settings(self, num_draft_tokens, temperature, max_new_tokens, seed, tree_nodes=0, adaptive=False) -> dict:
        """The API's settings: ``num_draft_tokens`` as the API means it (0 = no drafting), None when ``adaptive``
        (the engine picks each round's length from measured costs)."""
        def as_int(value, name):
            try:
                f = float(value)
            except (TypeError, ValueError):
                raise MMSpecError(f"{name} must be a number, got {value!r}") from None
            if f != f or f in (float("inf"), float("-inf")) or f != int(f):
                raise MMSpecError(f"{name} must be a whole number, got {value!r}")
            return int(f)

        k = None if adaptive or num_draft_tokens is None else as_int(num_draft_tokens, "number of draft tokens")
        try:
            temp = float(temperature if temperature is not None else 0.0)
        except (TypeError, ValueError):
            raise MMSpecError(f"temperature must be a number, got {temperature!r}") from None
        n = as_int(max_new_tokens, "max new tokens")
        if n > self.max_new_tokens_limit:
            raise MMSpecError(f"max new tokens is limited to {self.max_new_tokens_limit} here (the target's context "
                              f"and the demo's limit), got {n}")
        s = None if seed in (None, "") else as_int(seed, "seed")
        t = as_int(tree_nodes if tree_nodes is not None else 0, "tree nodes")
        return dict(num_draft_tokens=k, temperature=temp, max_new_tokens=n, seed=s,
                    tree_nodes=None if t == 0 else t)

    @staticmethod
    def _image(image):
        """The upload as mmspec takes it (a path, bytes or PIL.Image), or None for text only."""
        if isinstance(image, dict):  # a FileData-like payload
            image = image.get("path") or image.get("url")
        return image

    def generate(self, image, prompt, drafter_kind, num_draft_tokens=None, temperature=0.0, max_new_tokens=64,
                 compare=False, seed=0, tree_nodes=0, adaptive=False) -> Iterator[tuple[str, list, str, str, str]]:
        """Yields (tokens_html, rounds_table, stats_html, final_text, error_html) after every round. ``image``
        None asks text only. ``num_draft_tokens``: drafts per round as the API means it (0 = no drafting; None or
        ``adaptive`` = the engine picks); ``tree_nodes`` > 0 drafts a tree per round (0 = a chain)."""
        yield from self._guarded(lambda: self._generate((self._image(image), prompt), drafter_kind, num_draft_tokens,
                                                        temperature, max_new_tokens, compare, seed, tree_nodes,
                                                        adaptive))

    @staticmethod
    def _guarded(run) -> Iterator[tuple]:
        try:
            yield from run()
        except MMSpecError as e:
            yield "", [], "", "", error_html(str(e))
        except Exception as e:  # never a stack trace in the page; the log keeps it
            log.exception("demo request failed")
            yield "", [], "", "", error_html(f"internal error ({type(e).__name__}: {e}); see the server log")

    def chat(self, image, prompt, drafter_kind, num_draft_tokens=None, temperature=0.0, max_new_tokens=64,
             compare=False, seed=0, tree_nodes=0, adaptive=False, state=None) -> Iterator[tuple]:
        """One turn of a conversation: ``generate``'s five outputs, then the conversation state and its HTML.

        ``state`` (``{"messages": [...], "images": [...]}``, None to start) holds the turns so far in transformers'
        message format. The image in the box joins this turn only when it is not in the conversation yet, so a
        follow-up question about the same image sends no second copy; no image asks text only. The turn and the
        answer join the state when the answer is done (an error leaves the state as it was)."""
        state = state or {"messages": [], "images": []}
        image = self._image(image)
        new_images = [image] if image is not None and not any(_same(image, x) for x in state["images"]) else []
        if not isinstance(prompt, str) or not prompt.strip():
            yield "", [], "", "", error_html("the prompt is empty; ask something"), state, \
                conversation_html(state["messages"])
            return
        turn = {"role": "user", "content": [{"type": "image", "image": im} for im in new_images]
                + [{"type": "text", "text": prompt}]}
        messages = state["messages"] + [turn]
        out = None
        for out in self._guarded(lambda: self._generate((messages, None), drafter_kind, num_draft_tokens, temperature,
                                                        max_new_tokens, compare, seed, tree_nodes, adaptive)):
            yield (*out, state, conversation_html(state["messages"] + [turn]))
        if out is not None and not out[4]:
            answer = {"role": "assistant", "content": [{"type": "text", "text": out[3]}]}
            state = {"messages": messages + [answer], "images": state["images"] + new_images}
            yield (*out, state, conversation_html(state["messages"]))

    def _generate(self, request: tuple, drafter_kind, num_draft_tokens, temperature, max_new_tokens, compare, seed,
                  tree_nodes=0, adaptive=False):
        """``request``: (image or None, prompt), or (conversation, None)."""
        settings = self._settings(num_draft_tokens, temperature, max_new_tokens, seed, tree_nodes, adaptive)
        if settings["temperature"] == 0:
            settings["seed"] = None
        pipe = self.pipeline(drafter_kind or self.pipe.drafter_kind)
        renderer = TokenRenderer(pipe.processor.tokenizer if hasattr(pipe.processor, "tokenizer")
                                 else pipe.processor)
        event = None
        with closing(self._events(pipe, request, settings)) as events:  # closed with this handler: row freed
            for event, more_waiting in events:
                renderer.add_round(event.round)
                if event.done:
                    break
                if more_waiting:  # the page fell behind the engine: one update for all the rounds that came
                    continue
                yield (renderer.html(), renderer.table, stats_html(event.stats, event.stats.wall_s,
                                                                   pipe.drafter_kind, False), event.text, "")
        result = event.result
        cmp = None
        note = ""
        if compare:
            yield (renderer.html(), renderer.table,
                   stats_html(result.stats, result.stats.wall_s, pipe.drafter_kind, False,
                              note="running plain decoding (drafter none) on the same request for comparison…"),
                   result.text, "")
            base = None
            plain = dict(settings, tree_nodes=None)
            with closing(self._events(self.pipeline("none"), request, plain)) as events:
                for base, _ in events:
                    pass
            base = base.result
            plain_s, spec_s = base.stats.wall_s, result.stats.wall_s
            if settings["temperature"] == 0:
                same = "yes" if base.token_ids == result.token_ids else "NO (please report this)"
            else:
                same = "not expected with sampling (same distribution, different draws)"
            cmp = dict(wall_s=plain_s, tokens_per_s=base.stats.new_tokens / plain_s if plain_s > 0 else 0.0,
                       forwards=base.stats.target_forwards, speedup=plain_s / spec_s if spec_s > 0 else 0.0,
                       same=same)
            note = ("Plain decoding ran second and reused the cached image features, so the speedup shown is, "
                    "if anything, an underestimate. " if not result.stats.vision_cache_hit else "")
            note += ("Both times are measured in the shared engine: other users' requests in the same batch "
                     "slow both.")
        yield (renderer.html(), renderer.table, stats_html(result.stats, result.stats.wall_s, pipe.drafter_kind, True,
                                                           cmp, note), result.text, "")

    @staticmethod
    def _events(pipe: Pipeline, request: tuple, settings: dict) -> Iterator[tuple[StreamEvent, bool]]:
        """(event, more_waiting) per round of the request on ``pipe``'s shared batched engine, where it runs in one
        batch with the other users' requests (``pipe.submit``; bad input raises ``MMSpecError`` at once);
        ``more_waiting``: further rounds are already there. If the caller stops early (the page was closed, the
        request cancelled: Gradio closes the handler's generator), the row is freed at the next round."""
        from mmspec.scheduler import iter_job_events

        job = pipe.submit(*request, **settings)
        try:
            for event in iter_job_events(job, timeout=ROUND_TIMEOUT_S):
                if event.done and event.result is not None and event.result.error is not None:
                    raise MMSpecError(event.result.error)
                yield event, not job.events.empty()
        except queue.Empty:
            raise MMSpecError(f"the model produced nothing for {ROUND_TIMEOUT_S:.0f} s; try again later") from None
        finally:
            if not job.done:
                job.cancelled = True


def _same(a, b) -> bool:
    """The same upload: the same path or bytes, or the same image object."""
    return a is b or (isinstance(a, (str, bytes)) and type(a) is type(b) and a == b)
