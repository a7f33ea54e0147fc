"""Backends: each loads its models, then returns ``work(emit) -> Timing``, which hands every record of ``pending``
to ``emit`` (the caller writes it) as it finishes, in any order.

``local`` feeds this process's batched engine (continuous batching, ``pipe.submit``); ``ray`` runs the same
captioner on Ray Data, one model replica per worker, each worker decoding its batches with ``generate_batch``."""

from __future__ import annotations

import json
import os
import queue
import time
from typing import Callable, Iterable, Iterator

from demos.caption.inputs import Task
from demos.caption.record import Timing, baseline_pipeline, short_error, warm_up
from demos.caption.settings import DEFAULT_BATCH_SIZE, batch_size_of, check_prompts
from demos.caption.target import model_device
from mmspec import model_flags
from mmspec.errors import MMSpecError

LOOKAHEAD = 0.5           # inputs read and queued beyond the batch (a fraction of it), so a freed row refills at once
COMPARE_CHUNK = 4         # --compare: inputs measured side by side at a time, in batches
POLL_S = 0.005            # how often the feeding loop looks for finished rows
CANCEL_WAIT_S = 30.0      # how long a stopped run waits for its cancelled rows to leave the engine


def caption_one(*args, **kwargs) -> dict:
    """``demos.caption.caption_one`` (``record.caption_one``), looked up at each call, so that replacing the
    package's name replaces it here too (tests slow it down to stop a run mid-batch)."""
    from demos import caption

    return caption.caption_one(*args, **kwargs)


def feed(pipe, tasks: Iterable[Task], settings: dict, window: int, on_done: Callable) -> None:
    """Caption ``tasks`` on ``pipe``'s shared batched engine (``pipe.submit``; it keeps
    ``pipe.default_batch_size`` rows in flight and admits a waiting input as soon as a row finishes), with at most
    ``window`` inputs read and not finished at a time. ``on_done(task, result)`` runs in this thread as each input
    finishes, in completion order; ``result`` is None for an input ``submit`` refused (a bad file).
    Inputs still in the engine when this stops early (Ctrl-C, a failed write) are cancelled."""
    todo = iter(tasks)
    out: list = []  # (task, job), oldest first
    try:
        while True:
            while len(out) < window and (task := next(todo, None)) is not None:
                try:
                    out.append((task, pipe.submit(task.image, task.prompt, **settings)))
                except Exception:  # noqa: BLE001 - a bad input: on_done captions it alone, which says why
                    on_done(task, None)
            if not out:
                return
            finished = [pair[1].done for pair in out]
            if not any(finished):
                try:  # sleep until the oldest row has news, or POLL_S
                    out[0][1].events.get(timeout=POLL_S)
                except queue.Empty:
                    pass
                continue
            done = [pair for pair, f in zip(out, finished) if f]
            out = [pair for pair, f in zip(out, finished) if not f]
            for task, job in done:
                on_done(task, job.result)
    finally:
        _cancel([job for _, job in out])  # (those of ``done`` are finished already)


def _cancel(jobs: list) -> None:
    """Free the rows of ``jobs`` and wait (a little) until the engine has let them go."""
    for job in jobs:
        job.cancelled = True
    deadline = time.monotonic() + CANCEL_WAIT_S
    for job in jobs:
        while not job.done and time.monotonic() < deadline:
            try:
                job.events.get(timeout=0.05)
            except queue.Empty:
                pass


def run_local(args, pending: list[Task]) -> Callable[[Callable[[dict], None]], Timing]:
    """Loads the models now (before the progress bar starts); the returned ``work(emit)`` captions ``pending``
    through the batched engine, each record handed to ``emit`` as its row finishes.

    With ``--compare``, ``COMPARE_CHUNK`` batches of inputs at a time go through the speculative pipeline, then
    the same inputs through plain decoding at the same batch size; their lines follow the plain side."""
    pipe = model_flags.load_from_args(args)
    check_prompts(pipe, pending, args.tree_nodes)
    batch = batch_size_of(args)
    pipe.default_batch_size = batch  # the rows in flight of the pipeline's shared engine (made at the first submit)
    baseline = baseline_pipeline(pipe) if args.compare else None
    if baseline is not None:
        baseline.default_batch_size = batch
        warm_up(pipe, baseline)
    window = batch + max(1, int(batch * LOOKAHEAD))
    settings = dict(max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens,
                    tree_nodes=args.tree_nodes)
    timing = Timing()

    def record(task: Task, result=None, plain=None) -> dict:
        if result is not None and result.error is not None:
            timing.failed_in_batch += 1
        return caption_one(pipe, task, args.max_new_tokens, args.num_draft_tokens, baseline, result, plain,
                           tree_nodes=args.tree_nodes)

    def work(emit: Callable[[dict], None]) -> Timing:
        if baseline is None:
            t0 = time.perf_counter()
            feed(pipe, pending, settings, window, lambda task, res: emit(record(task, res)))
            timing.decode_s = time.perf_counter() - t0
            return timing
        step = batch * COMPARE_CHUNK
        for i in range(0, len(pending), step):
            chunk = pending[i:i + step]
            spec: dict = {}
            plain: dict = {}
            t0 = time.perf_counter()
            feed(pipe, chunk, settings, window, lambda task, res: spec.__setitem__(task.key, res))
            t1 = time.perf_counter()
            ok = [t for t in chunk if spec.get(t.key) is not None and spec[t.key].error is None]
            feed(baseline, ok, dict(max_new_tokens=args.max_new_tokens), window,
                 lambda task, res: plain.__setitem__(task.key, res))
            timing.decode_s += t1 - t0
            timing.plain_s += time.perf_counter() - t1
            timing.compared += len(ok)
            for task in chunk:
                emit(record(task, spec.get(task.key), plain.get(task.key)))
        return timing

    return work


def _batch_results(pipe, tasks: list[Task], batch_size: int, **settings) -> list:
    """``pipe.generate_batch`` over ``tasks`` (results in order); if the batch as a whole fails, no results
    (each input is then captioned alone by ``caption_one``)."""
    if not tasks:
        return []
    try:
        return pipe.generate_batch([t.image for t in tasks], [t.prompt for t in tasks], batch_size=batch_size,
                                   **settings)
    except Exception:  # noqa: BLE001 - KeyboardInterrupt still stops the worker
        return [None] * len(tasks)


class RayCaptioner:
    """The Ray Data worker: one model replica per actor, loaded once; each call captions one batch of inputs
    with ``generate_batch`` (``batch_size`` rows in flight)."""

    def __init__(self, load_kwargs: dict, max_new_tokens: int, num_draft_tokens: int | None, compare: bool,
                 num_threads: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, tree_nodes: int | None = None):
        import torch

        import mmspec

        torch.set_num_threads(max(1, int(num_threads)))
        self.pipe = mmspec.load(**load_kwargs)
        self.baseline = baseline_pipeline(self.pipe) if compare else None
        if self.baseline is not None:
            warm_up(self.pipe, self.baseline)
        self.max_new_tokens = max_new_tokens
        self.num_draft_tokens = num_draft_tokens
        self.tree_nodes = tree_nodes
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        tasks = [Task(str(path), str(prompt), tuple(str(p) for p in images)) for path, prompt, images
                 in zip(batch["path"], batch["prompt"], batch["images"])]
        results = _batch_results(self.pipe, tasks, self.batch_size, max_new_tokens=self.max_new_tokens,
                                 num_draft_tokens=self.num_draft_tokens, tree_nodes=self.tree_nodes)
        plains = [None] * len(tasks)
        if self.baseline is not None:  # the same inputs through plain decoding, at the same batch size
            ok = [i for i, r in enumerate(results) if r is not None and r.error is None]
            got = _batch_results(self.baseline, [tasks[i] for i in ok], self.batch_size,
                                 max_new_tokens=self.max_new_tokens)
            for i, res in zip(ok, got):
                plains[i] = res
        # Records travel back as JSON strings: no Arrow type inference over None/str/float columns.
        out = [json.dumps(caption_one(self.pipe, task, self.max_new_tokens, self.num_draft_tokens, self.baseline,
                                      res, plain, tree_nodes=self.tree_nodes), ensure_ascii=False)
               for task, res, plain in zip(tasks, results, plains)]
        return {"record": out}


def run_ray(args, pending: list[Task]) -> Callable[[Callable[[dict], None]], Timing]:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MMSpecError("--backend ray needs Ray Data: pip install 'mmspec[ray]' (or 'ray[data]>=2.9,<3')") from None

    def work(emit: Callable[[dict], None]) -> Timing:
        t0 = time.perf_counter()
        for rec in _ray_records(ray, args, pending):
            emit(rec)
        return Timing(decode_s=time.perf_counter() - t0, note="Ray start-up and the workers' model loading included")

    return work


def _ray_records(ray, args, pending: list[Task]) -> Iterator[dict]:
    if not pending:
        return
    workers = max(1, int(args.workers))
    cpus = float(args.num_cpus_per_worker)
    gpus = float(args.num_gpus_per_worker)
    load_kwargs = dict(model_flags.load_kwargs(args), device=model_device(args))
    started_here = False
    if not ray.is_initialized():
        init = dict(include_dashboard=False, log_to_driver=not args.quiet, ignore_reinit_error=True)
        if args.ray_address:
            ray.init(address=args.ray_address, **init)
        else:
            # a local instance: enough logical CPUs for the actors plus the driver-side read tasks
            ray.init(num_cpus=max(os.cpu_count() or 1, int(workers * max(cpus, 1)) + 1), **init)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        items = [{"path": t.path, "prompt": t.prompt, "images": list(t.images)} for t in pending]
        # Workers open the files themselves: on a remote cluster the paths must be visible to every node.
        if "override_num_blocks" in _params(ray.data.from_items):
            ds = ray.data.from_items(items, override_num_blocks=len(items))
        else:  # Ray < 2.10
            ds = ray.data.from_items(items, parallelism=len(items))
        ds = ds.map_batches(RayCaptioner, batch_size=batch_size_of(args), batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            fn_constructor_kwargs=dict(load_kwargs=load_kwargs, max_new_tokens=args.max_new_tokens,
                                                       num_draft_tokens=args.num_draft_tokens, compare=args.compare,
                                                       num_threads=max(1, int(cpus)),
                                                       batch_size=batch_size_of(args), tree_nodes=args.tree_nodes),
                            num_cpus=cpus, num_gpus=gpus if gpus > 0 else None)
        rows = iter(ds.iter_rows())
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - a dead worker, a lost cluster: the lines written stay valid
                raise MMSpecError(f"the Ray run stopped ({short_error(e)}); the captions written so far are kept, "
                                  f"rerun the same command to finish") from e
            yield json.loads(row["record"])
    finally:
        if started_here:
            ray.shutdown()


def _params(fn) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


BACKENDS = {"local": run_local, "ray": run_ray}
