"""The ``mmspec`` console script. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up and shares the model flags.

Start-up stays light: only the chosen subcommand's module is imported (its ``add_arguments`` imports nothing
heavy), so ``mmspec --help`` and ``mmspec caption --help`` print without loading torch, transformers or gradio.
Exit status: 0 done, 1 some inputs failed (the subcommand says which), 2 refused or stopped with an mmspec
error, 130 interrupted (Ctrl-C, at any point, without a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from mmspec.errors import MMSpecError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "caption": ("demos.caption", "caption images (files, folders, globs, lists) into JSONL; resumable"),
    "demo": ("demos.app", "open the web demo that shows accepted and rejected draft tokens"),
    "bench": ("mmspec.bench", "benchmark mmspec against transformers' generate, side by side"),
    "train-drafter": ("mmspec.training", "distil a drafter (text or visual) from a target VLM"),
    "serve": ("mmspec.server", "an OpenAI-compatible HTTP server (/v1/chat/completions) on the batched engine"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every subcommand shares; without them the bundled default pair is used."""
    g = parser.add_argument_group("model (default: the bundled tiny pair in assets/models, offline, CPU)")
    g.add_argument("--preset", default=None, help="a known real pair: llava-1.5-7b, qwen2.5-vl-7b, smolvlm2-2.2b, "
                                                  "... (the table in README.md, 'Presets'; mmspec.presets.PRESETS)")
    g.add_argument("--target", default=None, help="target VLM: hub id or local folder")
    g.add_argument("--drafter", default="default",
                   help="drafter model: hub id or folder; 'none' for weightless kinds (default: bundled with "
                        "the bundled target, none otherwise)")
    g.add_argument("--drafter-kind", default=None,
                   help="text | visual | vlm | eagle | ngram | none (mmspec.drafters.DRAFTER_KINDS; default: text when a "
                        "drafter model is given, else ngram)")
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


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the subcommand it names gets its flags (and its module imported).
    Without ``argv`` every subcommand is filled in."""
    parser = argparse.ArgumentParser(prog="mmspec", description="Lossless speculative decoding for vision-language "
                                     "models: same output as the VLM alone, fewer VLM forwards.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen_command(argv) if argv is not None else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module)
        if argv is not None and name != chosen:
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:  # a subcommand whose module is not built yet
            p.set_defaults(missing=str(e))
    return parser


def _interrupted(command: str | None, hint: str = "") -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while we say goodbye is not a traceback
    try:
        print(f"mmspec{' ' + command if command else ''}: interrupted" + (f"; {hint}" if hint else ""),
              file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    return 130


def _stdout_is_broken() -> bool:
    """Whether stdout is a pipe whose reader went away (``mmspec ... | head``)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _stdout_closed(command: str | None, hint: str = "") -> int:
    """stdout's reader went away: say so once on stderr and exit 2; what was written so far stays written."""
    try:  # later flushes of the dead stdout (at exit) must not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        print(f"mmspec{' ' + command if command else ''}: stopped: the program reading its output went away "
              f"(broken pipe)" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, module = _chosen_command(argv), None
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        if getattr(args, "missing", None):
            print(f"mmspec {args.command}: not available in this build ({args.missing})", file=sys.stderr)
            return 2
        module = importlib.import_module(args.module)
        return int(module.run(args) or 0)
    except MMSpecError as e:
        print(f"mmspec {command}: error: {e}" if command else f"mmspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(command, getattr(module, "INTERRUPT_HINT", ""))
    except BrokenPipeError:
        if not _stdout_is_broken():
            raise
        return _stdout_closed(command, getattr(module, "INTERRUPT_HINT", ""))


if __name__ == "__main__":
    sys.exit(main())
