"""One input's record (one line of the log), made from its row's result in the batched engine, or by captioning
the input alone when its row failed: the record is exactly what ``pipe.generate(image, prompt)`` gives, and a
bad input's record carries the error instead of stopping the batch."""

from __future__ import annotations

import time
from dataclasses import dataclass

from demos.caption.inputs import DEFAULT_PROMPT, Task
from mmspec.errors import MMSpecError

MAX_ERROR_CHARS = 300


@dataclass
class Timing:
    """What a backend measured over this run's inputs (model loading excluded unless said)."""

    decode_s: float = 0.0     # wall time of the speculative side
    plain_s: float = 0.0      # --compare: wall time of the plain side, over ``compared`` inputs
    compared: int = 0
    failed_in_batch: int = 0  # rows that ended with an error inside a batch, then captioned again alone
    note: str = ""            # what decode_s includes beyond decoding


def short_error(e: BaseException, path: str = "") -> str:
    """``e`` on one line of at most MAX_ERROR_CHARS, without the path the record already names."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if path and text.startswith(f"{path}: "):  # the line already names the file
        text = text[len(path) + 2:]
    msg = text if isinstance(e, MMSpecError) else f"{type(e).__name__}: {text}" if text else type(e).__name__
    return msg if len(msg) <= MAX_ERROR_CHARS else msg[: MAX_ERROR_CHARS - 3] + "..."


def baseline_pipeline(pipe):
    """Plain decoding (drafter kind "none") through the same target weights, with its own vision cache, so
    the baseline pays for encoding each image exactly as the speculative run does."""
    return pipe.with_drafter_kind("none", own_vision_cache=True)


def warm_up(*pipes) -> None:
    """One short batch per pipeline so one-time costs do not land on the first images' timing."""
    from PIL import Image

    img = Image.new("RGB", (64, 64), (120, 80, 200))
    for p in pipes:
        try:
            p.generate_batch([img, img], DEFAULT_PROMPT, max_new_tokens=4)
        except Exception:  # noqa: BLE001 - a failed warm-up only costs accuracy of the first timing
            pass


def _fill(rec: dict, res) -> None:
    s = res.stats
    rec.update(caption=res.text, tokens=s.new_tokens, mean_accepted=round(s.mean_accepted, 4),
               acceptance_rate=round(s.acceptance_rate, 4), drafted=s.drafted_tokens, accepted=s.accepted_tokens,
               target_forwards=s.target_forwards)


def caption_one(pipe, task: Task, max_new_tokens: int, num_draft_tokens: int | None, baseline=None,
                result=None, plain=None, tree_nodes: int | None = None) -> dict:
    """The record of ``task``; never raises for a bad input (only for KeyboardInterrupt and the like).

    ``result`` is the ``GenerationResult`` of its row in the batched engine, ``plain`` (with ``baseline``) that of
    its plain-decoding row: the record is made from them, ``time_s`` being the row's latency (from reading the
    input to its last token, in a batch shared with others). With no result, or one that ended with an error,
    the input is captioned here alone (``generate``, batch 1), so an error line always says what that input does
    by itself; the same for the plain side."""
    rec = {"path": task.path, "prompt": task.prompt, "caption": None, "tokens": 0, "mean_accepted": None,
           "acceptance_rate": None, "time_s": 0.0, "error": None}
    start = time.perf_counter()
    try:
        if result is not None and result.error is None:
            res, elapsed = result, result.stats.wall_s
        else:
            res = pipe.generate(task.image, task.prompt, max_new_tokens=max_new_tokens,
                                num_draft_tokens=num_draft_tokens, tree_nodes=tree_nodes)
            elapsed = time.perf_counter() - start
        _fill(rec, res)
        rec["time_s"] = round(elapsed, 4)
        if baseline is not None:
            if plain is not None and plain.error is None:
                plain_s = plain.stats.wall_s
            else:
                t0 = time.perf_counter()
                plain = baseline.generate(task.image, task.prompt, max_new_tokens=max_new_tokens)
                plain_s = time.perf_counter() - t0
            rec.update(plain_time_s=round(plain_s, 4), speedup=round(plain_s / elapsed, 4) if elapsed > 0 else None,
                       plain_matches=plain.token_ids == res.token_ids)
    except Exception as e:  # noqa: BLE001 - one odd input must not stop the batch; KeyboardInterrupt still does
        rec.update(error=short_error(e, task.path), time_s=round(time.perf_counter() - start, 4))
    return rec
