"""Where models come from: dtypes, devices, local folders and hub ids, each failure a clear ``MMSpecError``.

Shared by ``mmspec.load`` and the drafters' ``from_pretrained`` (so drafters never import the pipeline).

``tiny:<model_type>`` (e.g. ``mmspec bench --target tiny:qwen3_vl``) names a tiny random-weight model of that family
(``mmspec.tiny``), built offline into a temporary folder once per process: the per-round overhead against
``generate()`` can be measured on any family without a download (acceptance means nothing there).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from mmspec.errors import MMSpecError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_TARGET = ASSETS / "models" / "target"
BUNDLED_TEXT_DRAFTER = ASSETS / "models" / "text-drafter"
BUNDLED_VISUAL_DRAFTER = ASSETS / "models" / "visual-drafter"
BUNDLED_EAGLE_DRAFTER = ASSETS / "models" / "eagle-drafter"
BUNDLED_EAGLE3_DRAFTER = ASSETS / "models" / "eagle3-drafter"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32 if str(device).startswith("cpu") else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MMSpecError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def load_dtype(dtype=None, device: str = "cpu", preset: str | None = None) -> torch.dtype:
    """The dtype ``load(dtype=..., device=..., preset=...)`` runs the target in: the one given, else the preset's
    off the CPU, else float32 on the CPU and float16 elsewhere."""
    if dtype is None and preset is not None and not str(device).startswith("cpu"):
        from mmspec.presets import resolve_preset

        dtype = resolve_preset(preset).dtype
    return _resolve_dtype(dtype, device)


TINY_PREFIX = "tiny:"
_tiny_folders: dict[str, str] = {}


def scratch_folder(prefix: str) -> Path:
    """A temporary folder for a model built on the fly (``tiny:`` targets, ``bench --shaped``), removed when the
    process exits (a 1B shaped target is ~4 GB on disk)."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def tiny_folder(path) -> str | None:
    """The folder of the tiny model ``path`` names (``tiny:<model_type>``), built on first use; None for any other
    path."""
    if not (isinstance(path, str) and path.startswith(TINY_PREFIX)):
        return None
    model_type = path[len(TINY_PREFIX):]
    if model_type not in _tiny_folders:
        from mmspec.tiny import tiny_builder

        build = tiny_builder(model_type)     # an MMSpecError listing the tiny types for an unknown one
        folder = scratch_folder(f"mmspec-tiny-{model_type}-")
        _tiny_folders[model_type] = str(build(folder))
    return _tiny_folders[model_type]


def from_pretrained(loader, what: str, path, **kwargs):
    """``loader.from_pretrained(path)``; a failure is an ``MMSpecError`` naming what could not be loaded from where."""
    path = tiny_folder(path) or path
    check_model_path(what, path)
    try:
        return loader.from_pretrained(str(path), **kwargs)
    except MMSpecError:
        raise
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if not Path(os.path.expanduser(str(path))).is_dir():
            hint = (f" ({str(path)!r} is not a local folder, so it was taken as a hub id"
                    + ("; HF_HUB_OFFLINE is set and it is not in the local cache: download it once where the hub "
                       f"is reachable, e.g. `huggingface-cli download {path}`" if _hub_offline() else "")
                    + ")")
        raise MMSpecError(f"cannot load the {what} from {str(path)!r}: {first}{hint}") from e


HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_path(what: str, path) -> None:
    """A model given as a local path must be a folder that exists; a hub id (``org/name``) is left to the hub.

    A ``Path``, or a string that cannot be a hub id (``/abs``, ``./rel``, ``~/x``, ``a/b/c``), is a local path."""
    if tiny_folder(path) is not None:
        return
    text = os.path.expanduser(str(path))
    if os.path.isdir(text):
        return
    if os.path.exists(text):
        raise MMSpecError(f"the {what} {str(path)!r} is a file; give the model's folder (the one holding "
                          f"config.json) or a hub id")
    name = str(path)
    local = (isinstance(path, Path) or not HUB_ID.match(name) or ".." in name or "--" in name
             or any(part.startswith((".", "-")) or part.endswith((".", "-")) for part in name.split("/")))
    if local:
        raise MMSpecError(f"the {what} folder {str(path)!r} does not exist (give a local model folder, or a hub id "
                          f"such as llava-hf/llava-1.5-7b-hf)")


def check_device(device) -> str:
    """``device`` as ``load`` will use it, or an ``MMSpecError`` saying why this machine cannot."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MMSpecError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps ...") from None
    name = str(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None and torch.version.hip is None
                   else "torch sees no CUDA GPU (no driver, or CUDA_VISIBLE_DEVICES hides them)")
            raise MMSpecError(f"device {name!r} was asked for, but {why}; use device='cpu' (the bundled models run "
                              f"on a CPU)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise MMSpecError(f"device {name!r} was asked for, but this machine has {n} CUDA GPU(s): "
                              f"{', '.join(f'cuda:{i}' for i in range(n))}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise MMSpecError(f"device {name!r} was asked for, but Apple's MPS is not available here; use 'cpu'")
    elif dev.type != "cpu":
        available = getattr(getattr(torch, dev.type, None), "is_available", None)
        if callable(available) and not available():
            raise MMSpecError(f"device {name!r} was asked for, but torch reports no {dev.type} device here")
    return name
