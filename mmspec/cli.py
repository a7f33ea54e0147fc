"""The ``mmspec`` console script. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up. The model flags they share
(``--target/--drafter/--drafter-kind/--device/--dtype/...``) are defined once, in ``mmspec.model_flags``.

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
    "train-drafter": ("mmspec.training", "distil a drafter (text, visual or eagle) from a target VLM"),
    "tune-layerskip": ("mmspec.drafters.layerskip_tune", "find which layers the layerskip drafter skips for a "
                       "target, on your prompts; saves a skip-set file"),
    "serve": ("mmspec.server", "an OpenAI-compatible HTTP server (/v1/chat/completions) on the batched engine"),
}


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
