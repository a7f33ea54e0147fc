"""Which target writes the captions, and where it runs. Captions depend on the target and its numbers only (the
drafter never changes the output), so resuming an output file is safe exactly when ``target_identity`` is the
same as the one its lines record."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FULL_HASH_BYTES = 256 << 20  # weight files up to this size are hashed whole; larger: size + first/last MiB


def model_device(args) -> str:
    """Where the target runs: ``--device``, except that Ray workers given GPUs run on them."""
    device = str(getattr(args, "device", None) or "cpu")
    if getattr(args, "backend", None) == "ray" and float(getattr(args, "num_gpus_per_worker", 0) or 0) > 0 \
            and device.startswith("cpu"):
        return "cuda"  # Ray gives each actor its own CUDA_VISIBLE_DEVICES
    return device


def _file_fingerprint(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:  # a multi-GB checkpoint: its header (names, shapes) and both ends are enough to tell versions apart
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))


def target_identity(args) -> str:
    """Which target writes the captions: ``name@hash`` (a local folder's weights, a hub snapshot's commit),
    plus ``/dtype`` when the target runs in another dtype than float32.

    Float32 runs keep the bare ``name@hash`` that files written before the dtype was recorded hold; the device
    is left out (a float32 caption file may be finished on another machine).
    """
    from mmspec.pipeline import load_dtype

    target, preset = getattr(args, "target", None), getattr(args, "preset", None)
    if target is None and preset:
        from mmspec.presets import resolve_preset

        target = resolve_preset(preset).target
    resolved = str(load_dtype(getattr(args, "dtype", None), model_device(args), preset)).removeprefix("torch.")
    name = _weights_identity(target)
    return name if resolved == "float32" else f"{name}/{resolved}"


def _weights_identity(target) -> str:
    import hashlib

    from mmspec.pipeline import BUNDLED_TARGET

    folder = Path(os.path.expanduser(str(target))) if target is not None else BUNDLED_TARGET
    if folder.is_dir():
        h = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            if f.suffix in WEIGHT_SUFFIXES or f.name == "config.json":
                _file_fingerprint(f, h)
        name = "bundled" if target is None else str(folder.resolve())
        return f"{name}@{h.hexdigest()[:16]}"
    try:  # a hub id: the commit of the cached snapshot, found offline
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(target), "config.json")
        if isinstance(cached, str):
            return f"{target}@{Path(cached).parent.name[:16]}"
    except Exception:  # noqa: BLE001 - an identity without a commit is still the id
        pass
    return str(target)
