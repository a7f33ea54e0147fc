"""The ``mmspec`` console script. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up and shares the model flags."""

from __future__ import annotations

import argparse
import importlib
import sys

from mmspec.errors import MMSpecError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "caption": ("demos.caption", "caption images (files, folders, globs, lists) into JSONL; resumable"),
    "demo": ("demos.app", "open the web demo that shows accepted and rejected draft tokens"),
    "bench": ("mmspec.bench", "benchmark mmspec against transformers' generate, side by side"),
    "train-drafter": ("mmspec.training", "distil a drafter (text or visual) from a target VLM"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every subcommand shares; without them the bundled default pair is used."""
    g = parser.add_argument_group("model (default: the bundled tiny pair in assets/models, offline, CPU)")
    g.add_argument("--preset", default=None, help="a known real pair (see mmspec.presets / README)")
    g.add_argument("--target", default=None, help="target VLM: hub id or local folder")
    g.add_argument("--drafter", default="default",
                   help="drafter model: hub id or folder; 'none' for weightless kinds (default: bundled with "
                        "the bundled target, none otherwise)")
    g.add_argument("--drafter-kind", default=None,
                   help="text | visual | ngram | none (default: text when a drafter model is given, else ngram)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    g.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU, "
                                                 "float16 on GPU)")
    g.add_argument("--device-map", default=None, help="'auto' to spread a large target over devices (accelerate)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint's repo")


def load_from_args(args):
    import mmspec

    drafter = None if str(args.drafter).lower() == "none" else args.drafter
    return mmspec.load(target=args.target, preset=args.preset, drafter=drafter, drafter_kind=args.drafter_kind, device=args.device,
                       dtype=args.dtype, device_map=args.device_map, trust_remote_code=args.trust_remote_code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmspec", description="Lossless speculative decoding for vision-language "
                                     "models: same output as the VLM alone, fewer VLM forwards.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:  # a subcommand whose module is not built yet
            p.set_defaults(missing=str(e))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "missing", None):
        print(f"mmspec {args.command}: not available in this build ({args.missing})", file=sys.stderr)
        return 2
    module = importlib.import_module(args.module)
    try:
        return int(module.run(args) or 0)
    except MMSpecError as e:
        print(f"mmspec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(module, "INTERRUPT_HINT", "")
        print(f"mmspec {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
