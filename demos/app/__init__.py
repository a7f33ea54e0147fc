"""The web demo: a chat with the VLM about images (follow-up questions about the same image, another image in a
later turn, or no image at all), and for each answer, round by round, which draft tokens the VLM accepted (green),
which it rejected (red, struck through) and which it produced itself (blue).

    mmspec demo                              # bundled default pair, http://127.0.0.1:7860
    mmspec demo --host 0.0.0.0 --port 8080   # listen on every interface
    python -m demos.app --target llava-hf/llava-1.5-7b-hf --drafter double7/vicuna-68m --device cuda

``build_app(pipe)`` builds the ``gr.Blocks`` around any ``Pipeline``; ``launch(app, ...)`` starts it with the
upload limit, concurrency limit and CSS (both in ``page``; the token view and stats panel in ``render``; the
handlers in ``backend``; this file is the subcommand). The Send button's handler is ``app.mmspec_backend.chat`` (one
turn; ``app.mmspec_backend.generate`` answers one request on its own): generators yielding a tuple of output values
as rounds finish, so tests can call them without a browser.

Concurrent users share the batched engine: each request is ``pipe.submit``-ted to the shared engine of its
drafter kind's pipeline, so up to ``Pipeline.default_batch_size`` requests decode together in every target
forward; a request whose page is closed (or cancelled) leaves the batch at the next round.
"""

from __future__ import annotations

import argparse
import sys

# (DemoBackend and raw_image_input too: callers of build_app, tests among them, find them here)
from demos.app.backend import MAX_NEW_TOKENS_LIMIT, DemoBackend  # noqa: F401
from demos.app.page import DEFAULT_CONCURRENCY, DEFAULT_MAX_UPLOAD_MB, build_app, launch, raw_image_input  # noqa: F401
from mmspec.errors import MMSpecError
from mmspec.model_flags import add_model_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", default=False,
                        help="also open a public gradio.live link (off by default)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest image upload accepted, in MB (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"requests generated at once, decoded together in one batch per drafter kind; others "
                             f"wait in a queue (default: {DEFAULT_CONCURRENCY})")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="initial value of the slider (default: 64)")
    add_model_flags(parser)


def run(args) -> int:
    from mmspec.model_flags import load_from_args

    if not 0 < args.port < 65536:
        raise MMSpecError(f"--port must be in 1..65535, got {args.port}")
    if args.concurrency < 1:
        raise MMSpecError(f"--concurrency must be at least 1, got {args.concurrency}")
    if not args.max_upload_mb > 0:
        raise MMSpecError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    pipe = load_from_args(args)
    demo = build_app(pipe, default_max_new_tokens=max(1, min(args.max_new_tokens, MAX_NEW_TOKENS_LIMIT)))
    try:
        _, local_url, share_url = launch(demo, host=args.host, port=args.port, share=args.share,
                                         max_upload_mb=args.max_upload_mb, concurrency=args.concurrency,
                                         block=False, quiet=True)
    except OSError as e:  # port taken, address not available
        raise MMSpecError(f"cannot listen on {args.host}:{args.port} ({e}); pick another --port/--host") from None
    print(f"mmspec demo: serving on {local_url}" + (f" and publicly on {share_url}" if share_url else "")
          + "  (Ctrl+C to stop)", file=sys.stderr, flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m demos.app`` is ``mmspec demo``: the same flags, errors and exit codes."""
    from mmspec.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])
