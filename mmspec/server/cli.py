"""``mmspec serve``'s flags (``add_arguments``) and what it does with them (``run``): serve on uvicorn in the
foreground, or run the load test. ``mmspec.cli`` wires both in as the ``serve`` subcommand."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from mmspec.errors import MMSpecError
from mmspec.server.app import (BUNDLED_MODEL_ID, DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, MAX_IMAGE_BYTES,
                               REMOTE_TIMEOUT_S, build_app)
from mmspec.server.loadtest import load_test

API_KEY_ENV = "MMSPEC_API_KEY"


def resolve_api_key(flag: str | None) -> str | None:
    """``--api-key`` if given, else ``$MMSPEC_API_KEY``; empty means none."""
    return flag or os.environ.get(API_KEY_ENV, "").strip() or None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"client counts must be positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmspec.cli import add_model_arguments

    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this "
                                                             "machine only; 0.0.0.0 exposes it, set --api-key)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer <key>' on every request "
                                                        f"(default: the {API_KEY_ENV} environment variable, if set)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients name (default: "
                                                                  f"{BUNDLED_MODEL_ID} for the bundled pair, else "
                                                                  "the target's folder name or hub id)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="also fetch http(s) image URLs (the server then makes requests to any address a "
                             "client names; off by default: clients send data: URLs)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=MAX_BODY_BYTES,
                        help=f"largest request body (default: {MAX_BODY_BYTES})")
    parser.add_argument("--max-image-bytes", type=_positive_int, default=MAX_IMAGE_BYTES,
                        help=f"largest image, decoded or fetched (default: {MAX_IMAGE_BYTES})")
    parser.add_argument("--remote-timeout", type=float, default=REMOTE_TIMEOUT_S,
                        help=f"seconds to fetch a remote image (default: {REMOTE_TIMEOUT_S:g})")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="rows in flight in the shared engine (default: the pipeline's, 16)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default: info)")
    g = parser.add_argument_group("load test (loopback only; prints a markdown table and exits)")
    g.add_argument("--load-test", action="store_true", help="measure throughput and latency instead of serving")
    g.add_argument("--load-clients", type=_int_list, default=(1, 4, 16), help="concurrent clients (default: 1,4,16)")
    g.add_argument("--load-requests", type=_positive_int, default=64, help="requests per level (default: 64)")
    g.add_argument("--load-max-tokens", type=_positive_int, default=64, help="max_tokens per request (default: 64)")
    g.add_argument("--load-drafting", choices=["both", "on", "off"], default="both",
                   help="drafting on (the loaded drafter), off (drafter kind none) or both (default)")
    add_model_arguments(parser)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before the model loads, not after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise MMSpecError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") \
                from None


def run(args) -> int:
    from mmspec.cli import load_from_args

    if not 0 <= args.port <= 65535:
        raise MMSpecError(f"--port must be in [0, 65535], got {args.port}")
    if not args.remote_timeout > 0:
        raise MMSpecError(f"--remote-timeout must be positive, got {args.remote_timeout}")
    if not args.load_test:
        _check_port(args.host, args.port)
    pipe = load_from_args(args)
    if args.batch_size is not None:
        pipe.default_batch_size = args.batch_size   # read when the shared engine starts, at the first request
    if args.load_test:
        drafting = {"both": (True, False), "on": (True,), "off": (False,)}[args.load_drafting]
        load_test(pipe, concurrency=args.load_clients, drafting=drafting, requests_per_level=args.load_requests,
                  max_tokens=args.load_max_tokens)
        return 0
    import uvicorn

    api_key = resolve_api_key(args.api_key)
    app = build_app(pipe, api_key=api_key, allow_remote_images=args.allow_remote_images,
                    model_id=args.served_model_name, max_body_bytes=args.max_body_bytes,
                    max_image_bytes=args.max_image_bytes, remote_timeout_s=args.remote_timeout)
    model_id = app.state.mmspec.config.model_id
    if not _is_loopback(args.host) and not api_key:
        print(f"mmspec serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              f"port can use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr)
    print(f"mmspec serve: model {model_id!r} (drafter {pipe.drafter_kind}) on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}; Ctrl-C stops", file=sys.stderr, flush=True)
    # uvicorn.Server, not uvicorn.run (which swallows Ctrl-C): Ctrl-C stops the server gracefully, then exits 130
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                  timeout_graceful_shutdown=5)).run()
    return 0
