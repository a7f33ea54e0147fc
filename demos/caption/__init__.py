"""Batch captioning that never loses work: ``mmspec caption PATHS... --out captions.jsonl``.

Inputs are image files, folders (searched recursively for image extensions), glob patterns, or list files
(``.txt``: one path per line; ``.jsonl``: one ``{"path": ..., "prompt": ...}`` per line). Each input gets
exactly one JSON line in ``--out``::

    {"mmspec": "caption/1", "path", "prompt", "caption", "tokens", "mean_accepted", "acceptance_rate",
     "time_s", "error", ...}

Guarantees (see docs/CAPTIONING.md):

- mmspec writes only files of its own (the first line is a caption record) or new ones: any other existing
  ``--out``/``--csv`` is refused before work starts (exit status 2) and left byte-for-byte as it was; inside
  our file only our lines are trusted. Flag values, prompts and output paths are all checked before the first
  input, so a value wrong for every input never turns into an error line per input;
- up to ``--batch-size`` inputs are decoded together (continuous batching); each line is written with one
  ``write`` and ``fsync``-ed as its row finishes, so a crash loses at most the inputs in flight (with
  ``--compare``, the few batches being compared); lines come in completion order;
- a rerun with the same ``--out`` skips the inputs already done (same path and prompt) and finishes the rest;
  a last line cut by a crash is detected, removed, and that input is redone;
- one process at a time writes an output file (an exclusive ``flock``), so two runs cannot interleave;
- inputs whose line records an error count as done (the error is the answer for a corrupt file);
  ``--retry-errors`` redoes them, replacing their error lines so that each input still has one line;
- a bad image never stops the batch: it gets an error line and the exit status is 1;
- a write that fails (disk full) is taken back and stops the run (exit status 2), the file still ending in a
  complete line; rerunning finishes it.

The captions are exactly what ``pipe.generate(image, prompt)`` returns, at any batch size. ``--backend ray`` runs
the same captioner on Ray Data, one model replica per worker, each worker decoding its batches with
``generate_batch``; the driver alone writes the file, with the same guarantees.
Also runnable as ``python -m demos.caption``.

One module per concern: ``inputs`` (what to caption), ``files`` (the formats written, and the checks that only
files of ours are written, through ``mmspec.outputs``), ``log`` (the append-only JSONL: resume, repair, lock),
``target`` (which target wrote a line), ``record`` (one input's line), ``settings`` (defaults and flag checks),
``backends`` (local engine, Ray Data), ``report`` (what is printed), ``cli`` (flags and the run).
"""

import os  # noqa: F401 - ``caption.os``: the module the log writes through (tests make its writes fail)

from demos.caption.backends import BACKENDS, RayCaptioner, feed, run_local, run_ray
from demos.caption.cli import INTERRUPT_HINT, add_arguments, main, run
from demos.caption.files import EXTRA_FIELDS, FIELDS, FORMAT, check_outputs, is_own
from demos.caption.inputs import DEFAULT_PROMPT, IMAGE_EXTENSIONS, Task, expand_inputs, record_key
from demos.caption.log import CaptionLog, WriteFailed, read_records, write_csv
from demos.caption.record import Timing, baseline_pipeline, caption_one
from demos.caption.settings import DEFAULT_BATCH_SIZE, check_flags, check_prompts
from demos.caption.target import model_device, target_identity

_is_own = is_own  # the name tests/test_user_input.py and tests/test_caption.py check records with

__all__ = ["BACKENDS", "CaptionLog", "DEFAULT_BATCH_SIZE", "DEFAULT_PROMPT", "EXTRA_FIELDS", "FIELDS", "FORMAT",
           "IMAGE_EXTENSIONS", "INTERRUPT_HINT", "RayCaptioner", "Task", "Timing", "WriteFailed", "add_arguments",
           "baseline_pipeline", "caption_one", "check_flags", "check_outputs", "check_prompts", "expand_inputs",
           "feed", "is_own", "main", "model_device", "read_records", "record_key", "run", "run_local", "run_ray",
           "target_identity", "write_csv"]
