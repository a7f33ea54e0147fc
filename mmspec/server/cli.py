"""``mmspec serve``'s flags (``add_arguments``) and what it does with them (``run``): serve on uvicorn in the
foreground, serve N replicas on Ray Serve (``--replicas``), or run the load test. ``mmspec.cli`` wires both in
as the ``serve`` subcommand."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys

from mmspec.argtypes import int_at_least, positive_float
from mmspec.errors import MMSpecError
from mmspec.server.backend import BUNDLED_MODEL_ID
from mmspec.server.config import (DEFAULT_HOST, DEFAULT_PORT, DRAIN_S, MAX_BODY_BYTES, MAX_IMAGE_BYTES, MAX_IMAGES,
                                  REMOTE_TIMEOUT_S, ServerConfig)

API_KEY_ENV = "MMSPEC_API_KEY"


def resolve_api_key(flag: str | None) -> str | None:
    """``--api-key`` if given, else ``$MMSPEC_API_KEY``; empty means none."""
    return flag or os.environ.get(API_KEY_ENV, "").strip() or None


_positive_int = int_at_least(1)
_count = int_at_least(0)


def _replica_count(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _positive_int(text)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"counts must be positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmspec.model_flags import add_model_flags

    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this "
                                                             "machine only; 0.0.0.0 exposes it, set --api-key)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer <key>' on /v1/* and /metrics "
                                                        f"(default: the {API_KEY_ENV} environment variable, if set); "
                                                        "/health stays open")
    parser.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
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
    parser.add_argument("--max-images", type=_positive_int, default=MAX_IMAGES,
                        help=f"images one request may hold, across its turns (default: {MAX_IMAGES})")
    parser.add_argument("--remote-timeout", type=float, default=REMOTE_TIMEOUT_S,
                        help=f"seconds to fetch a remote image (default: {REMOTE_TIMEOUT_S:g})")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="rows in flight in the shared engine (per replica with --replicas; default: the "
                             "pipeline's, 16)")
    parser.add_argument("--max-waiting", type=_count, default=None,
                        help="requests that may wait beyond the rows of the batch(es); more get 503 with "
                             "Retry-After (default: no bound)")
    parser.add_argument("--request-timeout", type=positive_float, default=None,
                        help="seconds a request may run; a longer one is stopped (504, its row freed; default: none)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's (or Ray Serve's) log level (default: info)")
    g = parser.add_argument_group("replicas on Ray Serve (pip install 'mmspec[ray]')")
    g.add_argument("--replicas", type=_replica_count, default=None,
                   help="run N engine replicas (each one model, one batch) behind the same routes; 'auto': one per "
                        "GPU of the cluster with --device cuda (default: one process, no Ray)")
    g.add_argument("--max-replicas", type=_positive_int, default=None,
                   help="let Ray Serve's autoscaler run between --replicas and this many replicas")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica (default: 1 with --device cuda, else 0); > 1 for targets that need more "
                        "(with --device-map auto)")
    g.add_argument("--cpus-per-replica", type=positive_float, default=1.0,
                   help="CPUs per replica; on CPU also its torch threads (default: 1)")
    g.add_argument("--replica-queue", type=_count, default=None,
                   help="requests each replica holds beyond its batch, joining at its next round (default: "
                        "--batch-size; the rest wait in Ray Serve's router)")
    g.add_argument("--ray-address", default=None,
                   help="a running Ray cluster ('auto' for one started with 'ray start' here, or host:port; default: "
                        "$RAY_ADDRESS, else a local instance started and stopped with the server)")
    g.add_argument("--app-name", default="mmspec", help="the Ray Serve application's name (default: mmspec)")
    g.add_argument("--route-prefix", default="/",
                   help="where the routes live on Serve's proxy, for several models on one cluster (default: /)")
    g = parser.add_argument_group("load test (loopback only; prints a markdown table and exits)")
    g.add_argument("--load-test", action="store_true", help="measure throughput and latency instead of serving")
    g.add_argument("--load-clients", type=_int_list, default=(1, 4, 16, 64),
                   help="concurrent clients (default: 1,4,16,64)")
    g.add_argument("--load-requests", type=_positive_int, default=64, help="requests per level (default: 64)")
    g.add_argument("--load-max-tokens", type=_positive_int, default=64, help="max_tokens per request (default: 64)")
    g.add_argument("--load-drafting", choices=["both", "on", "off"], default="both",
                   help="in one process: drafting on (the loaded drafter), off (drafter kind none) or both (default)")
    g.add_argument("--load-replicas", type=_int_list, default=None,
                   help="a replicas axis instead, e.g. 1,2: the same levels on N Ray Serve replicas each (local Ray, "
                        "--cpus-per-replica / --gpus-per-replica as for --replicas)")
    add_model_flags(parser)


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


def server_config(args) -> ServerConfig:
    return ServerConfig(model_id=args.served_model_name, api_key=resolve_api_key(args.api_key),
                        allow_remote_images=args.allow_remote_images, max_body_bytes=args.max_body_bytes,
                        max_image_bytes=args.max_image_bytes, remote_timeout_s=args.remote_timeout,
                        max_waiting=args.max_waiting, request_timeout_s=args.request_timeout,
                        metrics_public=args.metrics_public, max_images=args.max_images)


def replica_options(args, replicas: int | str):
    """``ReplicaOptions`` from the flags; ``replicas='auto'``: one per GPU of the cluster (Ray must be up)."""
    from mmspec import model_flags
    from mmspec.server.replicas import ReplicaOptions, import_serve

    load_kwargs = model_flags.load_kwargs(args)
    if replicas == "auto":
        ray, _ = import_serve()
        gpus = float(ray.cluster_resources().get("GPU", 0))
        per = args.gpus_per_replica or 1.0
        if not str(args.device).startswith("cuda") or gpus < per:
            raise MMSpecError(f"--replicas auto means one replica per GPU: give --device cuda on a cluster with "
                              f"GPUs (this one has {gpus:g}); on CPU give a number")
        replicas = int(gpus // per)
    return ReplicaOptions(replicas=replicas, max_replicas=args.max_replicas, batch_size=args.batch_size or 16,
                          gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                          replica_queue=args.replica_queue,
                          load_kwargs=load_kwargs, server=server_config(args), app_name=args.app_name,
                          route_prefix=args.route_prefix)


def _serve_replicas(args) -> int:
    from mmspec.server import replicas as ray_replicas

    ray_replicas.import_serve()
    if not args.ray_address and not os.environ.get("RAY_ADDRESS"):
        _check_port(args.host, args.port)   # a local Serve binds it; a cluster's Serve has its own port
    options = replica_options(args, args.replicas) if args.replicas != "auto" else None
    quiet = args.log_level not in ("info", "debug")
    if options is None:   # 'auto' reads the cluster's GPUs, so Ray comes up first
        started = ray_replicas.connect(replica_options(args, 1), args.ray_address, quiet=quiet)
        try:
            options = replica_options(args, "auto")
        except BaseException:
            if started:
                ray_replicas.import_serve()[0].shutdown()
            raise
    if not _is_loopback(args.host) and not options.server.api_key:
        print(f"mmspec serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              f"port can use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr)
    return ray_replicas.serve_replicas(options, args.host, args.port, args.ray_address, quiet=quiet)


def run(args) -> int:
    from mmspec.model_flags import load_from_args

    if not 0 <= args.port <= 65535:
        raise MMSpecError(f"--port must be in [0, 65535], got {args.port}")
    if not args.remote_timeout > 0:
        raise MMSpecError(f"--remote-timeout must be positive, got {args.remote_timeout}")
    config = server_config(args)
    if args.load_test:
        from mmspec.server.loadtest import load_test

        if args.load_replicas:
            load_test(concurrency=args.load_clients, requests_per_level=args.load_requests,
                      max_tokens=args.load_max_tokens, replicas=args.load_replicas,
                      replica_options=replica_options(args, 1))
            return 0
        pipe = load_from_args(args)
        if args.batch_size is not None:
            pipe.default_batch_size = args.batch_size
        drafting = {"both": (True, False), "on": (True,), "off": (False,)}[args.load_drafting]
        load_test(pipe, concurrency=args.load_clients, drafting=drafting, requests_per_level=args.load_requests,
                  max_tokens=args.load_max_tokens)
        return 0
    if args.replicas is not None:
        return _serve_replicas(args)
    _check_port(args.host, args.port)
    import uvicorn

    from mmspec.server.app import backend_app
    from mmspec.server.backend import LocalBackend

    pipe = load_from_args(args)
    if args.batch_size is not None:
        pipe.default_batch_size = args.batch_size   # read when the shared engine starts, at the first request
    app = backend_app(LocalBackend(pipe, config), config)
    model_id = app.state.mmspec.config.model_id
    if not _is_loopback(args.host) and not config.api_key:
        print(f"mmspec serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              f"port can use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr)
    print(f"mmspec serve: model {model_id!r} (drafter {pipe.drafter_kind}) on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if config.api_key else ''}; Ctrl-C or SIGTERM drains and stops", file=sys.stderr,
          flush=True)
    # uvicorn.Server, not uvicorn.run (which swallows Ctrl-C): on Ctrl-C or SIGTERM it stops taking connections
    # and gives the requests in flight up to DRAIN_S to finish, then raises the signal again for the handler it
    # found. That handler is ours for SIGTERM (a drained server exits 0); Ctrl-C ends as KeyboardInterrupt (130).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                      timeout_graceful_shutdown=int(DRAIN_S))).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        pipe.close()
    return 0
