"""The model flags every ``mmspec`` subcommand shares, defined once: ``add_model_flags(parser)`` adds them,
``load_kwargs(args)`` turns the parsed flags into ``mmspec.load`` keywords, ``load_from_args(args)`` loads the
pipeline. Without the flags, the bundled default pair is used.

Importing this module imports neither torch nor a drafter, so a subcommand adds these flags while
``mmspec <command> --help`` prints.
"""

from __future__ import annotations

import argparse

from mmspec.drafters import DRAFTER_KINDS


def add_model_flags(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """Add ``--preset/--target/--drafter/--drafter-kind/--device/--dtype/--device-map/--trust-remote-code`` in a
    group of their own; returns their ``dest`` names (the keys ``load_kwargs`` reads)."""
    g = parser.add_argument_group("model (default: the bundled tiny pair in assets/models, offline, CPU)")
    flags = [
        g.add_argument("--preset", default=None,
                       help="a known real pair: llava-1.5-7b, qwen2.5-vl-7b, smolvlm2-2.2b, ... (the table in "
                            "README.md, 'Presets'; mmspec.presets.PRESETS)"),
        g.add_argument("--target", default=None, help="target VLM: hub id or local folder"),
        g.add_argument("--drafter", default="default",
                       help="drafter model: hub id or folder; 'none' for weightless kinds (default: bundled with "
                            "the bundled target, none otherwise)"),
        g.add_argument("--drafter-kind", default=None,
                       help=f"{' | '.join(DRAFTER_KINDS)} (mmspec.drafters.DRAFTER_KINDS; default: text when a "
                            "drafter model is given, else ngram)"),
        g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (default: cpu)"),
        g.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU, "
                                                     "float16 on GPU)"),
        g.add_argument("--device-map", default=None, help="'auto' to spread a large target over devices (accelerate)"),
        g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint's repo"),
    ]
    return tuple(flag.dest for flag in flags)


def load_kwargs(args) -> dict:
    """The ``mmspec.load`` keywords the parsed model flags ask for (``--drafter none``: no drafter model)."""
    drafter = None if str(args.drafter).lower() == "none" else args.drafter
    return dict(target=args.target, preset=args.preset, drafter=drafter, drafter_kind=args.drafter_kind,
                device=args.device, dtype=args.dtype, device_map=args.device_map,
                trust_remote_code=args.trust_remote_code)


def load_from_args(args):
    """``mmspec.load`` with the parsed model flags: the ``Pipeline`` a subcommand runs."""
    import mmspec

    return mmspec.load(**load_kwargs(args))
