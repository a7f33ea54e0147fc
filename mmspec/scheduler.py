"""The engine on a thread of its own: ``Scheduler`` keeps one ``Engine`` busy for callers on other threads (demo
users, server clients); ``iter_job_events`` reads a submitted job's events as they come."""

from __future__ import annotations

import atexit
import queue
import threading
from typing import Iterator

import torch

from mmspec.drafters.base import Drafter
from mmspec.engine import Engine, Job
from mmspec.policy import DraftPolicy
from mmspec.targets.base import TargetAdapter
from mmspec.types import StreamEvent


class Scheduler:
    """A background thread that keeps one ``Engine`` busy for callers on other threads (demo users, server
    clients): ``submit`` queues a job and returns it; its events arrive on ``job.events``; a job that is
    cancelled (client gone) leaves the batch at the next round."""

    def __init__(self, adapter: TargetAdapter, strategy: Drafter, max_batch: int,
                 policy: DraftPolicy | None = None):
        self.engine = Engine(adapter, strategy, max_batch, policy)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="mmspec-engine", daemon=True)
        self.thread.start()
        # stop between rounds before the interpreter goes down: a thread killed inside a forward aborts it
        atexit.register(self.close)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after the round in progress. Jobs still queued or running then get a last event
        (``done``, stop reason "error": the engine was closed), so no caller waits on them forever."""
        self.closing = True
        self.wake.set()
        if threading.current_thread() is self.thread:
            return
        self.thread.join(timeout)
        if self.thread.is_alive():
            return   # still inside a forward: its jobs are not ours to touch
        atexit.unregister(self.close)   # the exit hook held the engine, and with it the model, alive
        engine = self.engine
        with self.lock:
            left = list(engine.queue) + list(engine.active.values())
            engine.queue.clear()
            engine.active.clear()
        for job in left:
            if job.events is not None and not job.done:
                job.events.put(engine.finish_error(job, "the pipeline was closed before this request finished"))

    def submit(self, job: Job) -> Job:
        job.events = queue.Queue()
        with self.lock:
            self.engine.add(job)
        self.wake.set()
        return job

    @torch.inference_mode()
    def _loop(self) -> None:
        while not self.closing:
            self.wake.wait()
            while not self.closing:
                with self.lock:
                    if not self.engine.busy:
                        self.wake.clear()
                        break
                try:
                    events = self.engine.step()
                except Exception as e:  # keep serving: every row in flight gets the error
                    events = self.engine.fail_active(f"{type(e).__name__}: {e}")
                for job, event in events:
                    job.events.put(event)


def iter_job_events(job: Job, timeout: float | None = None) -> Iterator[StreamEvent]:
    """The events of a submitted job as they come (blocking); ends after the ``done`` event."""
    while True:
        event = job.events.get(timeout=timeout)
        yield event
        if event.done:
            return


__all__ = ["Scheduler", "iter_job_events"]
