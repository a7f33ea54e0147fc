"""``mmspec serve --replicas N``: N engine replicas behind the same OpenAI routes, on Ray Serve.

One Ray Serve application of two deployments:

- ``engine`` (``EngineReplica``), N replicas: each loads one pipeline and answers with one continuous batch (a
  ``LocalBackend``); ``--gpus-per-replica`` GPUs each (one by default when ``--device`` is CUDA: Ray pins each
  replica to its own), ``--cpus-per-replica`` CPUs (torch threads on CPU). ``max_ongoing_requests`` is the batch
  size plus ``--replica-queue`` (default: one more batch): a replica holds that many requests, those beyond its
  batch in its engine's own queue, where they join at the very next round; the rest wait in Ray Serve's router
  in the ingress, which retries with a backoff of up to 0.5 s (rows would sit idle if every waiting request
  waited there). With ``--max-replicas M`` Ray Serve's autoscaler runs N..M replicas, aiming at one batch of
  requests per replica. A replica that dies is replaced by Ray Serve (health checks every 2 s).
- ``ingress`` (``Ingress``), one replica without a GPU: the same FastAPI app as the single process
  (``mmspec.server.app``) on a ``ReplicaBackend``, which calls the engine deployment through its
  ``DeploymentHandle`` and streams its pieces back. Auth, validation, ``--max-waiting``, ``--request-timeout``
  and ``/metrics`` live here, so every replica's requests pass one set of counters: ``/metrics`` is aggregated
  over the replicas by construction, and each replica's load and peak memory arrive with its pieces.

A request whose replica dies gets 503 with OpenAI's error object (as the last event when streamed), never a
hang; one that had produced nothing yet is sent once more, to another replica. SIGTERM or Ctrl-C drains:
the ingress refuses new requests (503 ``shutting_down``), requests in flight finish (up to ``DRAIN_S``), then
the application is deleted, and a local Ray started here is shut down.

Ray is imported only here, and ``mmspec serve`` imports this module only with ``--replicas`` (or the load test's
``--load-replicas``).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mmspec.errors import MMSpecError
from mmspec.server.config import DEFAULT_HOST, DEFAULT_PORT, DRAIN_S, ServerConfig
from mmspec.server.protocol import APIError, unavailable

APP_NAME = "mmspec"
HEALTH_CHECK_PERIOD_S = 2.0
INGRESS_MAX_ONGOING = 8192        # HTTP requests the ingress holds at once (--max-waiting bounds the queue)


def import_serve():
    """``(ray, ray.serve)``, or an ``MMSpecError`` saying how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MMSpecError("--replicas needs Ray Serve: pip install 'mmspec[ray]' (or 'ray[serve]>=2.60,<3')") from None
    return ray, serve


@dataclass(frozen=True)
class ReplicaOptions:
    """What the replicas run: ``mmspec.load(**load_kwargs)`` in each, ``batch_size`` rows per replica, and the
    server settings the ingress applies. ``setup(pipe)``, if given, runs in each replica after loading."""

    replicas: int = 2
    max_replicas: int | None = None      # autoscaling between replicas and max_replicas
    batch_size: int = 16
    gpus_per_replica: float | None = None   # None: 1 when the device is CUDA, else 0
    cpus_per_replica: float = 1.0
    replica_queue: int | None = None     # requests a replica holds beyond its batch (None: batch_size)
    load_kwargs: dict = field(default_factory=dict)
    server: ServerConfig = field(default_factory=ServerConfig)
    app_name: str = APP_NAME
    route_prefix: str = "/"
    setup: Callable | None = None

    def __post_init__(self):
        for name in ("replicas", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MMSpecError(f"{name} must be a positive integer, got {value!r}")
        if self.max_replicas is not None and (not isinstance(self.max_replicas, int)
                                              or self.max_replicas < self.replicas):
            raise MMSpecError(f"max_replicas must be an integer >= replicas ({self.replicas}), got "
                              f"{self.max_replicas!r}")
        if self.gpus_per_replica is not None and not self.gpus_per_replica >= 0:
            raise MMSpecError(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica!r}")
        if self.replica_queue is not None and (not isinstance(self.replica_queue, int) or self.replica_queue < 0):
            raise MMSpecError(f"replica_queue must be a non-negative integer, got {self.replica_queue!r}")
        if not self.cpus_per_replica > 0:
            raise MMSpecError(f"cpus_per_replica must be > 0, got {self.cpus_per_replica!r}")
        if not self.route_prefix.startswith("/"):
            raise MMSpecError(f"the route prefix must start with '/', got {self.route_prefix!r}")
        device = str(self.load_kwargs.get("device") or "cpu")
        if device.startswith("cuda") and self.gpus_per_replica == 0:
            raise MMSpecError("--device cuda with --gpus-per-replica 0: each replica needs a GPU of its own")

    @property
    def gpus(self) -> float:
        if self.gpus_per_replica is not None:
            return float(self.gpus_per_replica)
        return 1.0 if str(self.load_kwargs.get("device") or "cpu").startswith("cuda") else 0.0

    @property
    def device(self) -> str:
        """Where a replica's model goes: ``--device``, except that replicas given GPUs run on them: Ray sets each
        replica's ``CUDA_VISIBLE_DEVICES``, so ``cuda`` is its own GPU (and ``cuda:1`` would be someone else's)."""
        device = str(self.load_kwargs.get("device") or "cpu")
        return "cuda" if self.gpus > 0 and (device == "cpu" or device.startswith("cuda")) else device

    @property
    def max_ongoing(self) -> int:
        """Requests Ray Serve's router gives one replica at once: its batch and its own queue."""
        return self.batch_size + (self.batch_size if self.replica_queue is None else self.replica_queue)

    @property
    def capacity(self) -> int:
        """Rows over all replicas (at the most replicas autoscaling allows)."""
        return self.batch_size * (self.max_replicas or self.replicas)


# ----------------------------------------------------------------------------------------------------------
# the deployments
# ----------------------------------------------------------------------------------------------------------
class EngineReplica:
    """One engine replica: one pipeline, one continuous batch; its pieces stream to the ingress."""

    def __init__(self, options: ReplicaOptions):
        import torch
        from ray import serve

        import mmspec
        from mmspec.server.backend import LocalBackend

        if options.device == "cpu":
            torch.set_num_threads(max(1, int(options.cpus_per_replica)))
        pipe = mmspec.load(**dict(options.load_kwargs, device=options.device))
        pipe.default_batch_size = options.batch_size
        if options.setup is not None:
            options.setup(pipe)
        self.backend = LocalBackend(pipe, options.server, replica_id=serve.get_replica_context().replica_id.unique_id)

    def describe(self) -> dict:
        return self.backend.card

    async def answer(self, chat):
        try:
            async for piece in self.backend.answer(chat):
                yield piece
        except APIError as e:   # plain data across the process boundary; the ingress raises it again
            yield {"error": e.as_dict()}

    def check_health(self) -> None:
        scheduler = getattr(self.backend.pipe, "_scheduler", None)
        if scheduler is not None and not scheduler.thread.is_alive():
            raise RuntimeError("the engine thread of this replica stopped")

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.pipe.close()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class ReplicaBackend:
    """The ingress's backend: each request is one streamed call on the engine deployment's handle; Ray Serve
    picks the replica. Keeps each replica's last reported load and peak memory for ``/metrics``."""

    def __init__(self, handle, card: dict, options: ReplicaOptions):
        self.handle = handle.options(stream=True)
        self.card = card
        self.capacity = options.capacity
        self.replica_count = options.replicas if options.max_replicas is None else \
            f"{options.replicas}..{options.max_replicas}"
        self.table: dict[str, dict] = {}

    def replicas(self) -> list[dict]:
        return list(self.table.values())

    def _error(self, e: Exception) -> APIError:
        import ray.exceptions
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(e, BackPressureError):
            return unavailable(f"the replicas' queues are full ({_short(e)}); retry shortly", "queue_full")
        if isinstance(e, (ray.exceptions.RayActorError, DeploymentUnavailableError)):
            self.table.clear()   # reports of a dead replica would linger; the live ones report again
            return unavailable(f"the replica answering this request stopped ({_short(e)}); Ray Serve replaces it: "
                               f"retry the request", "replica_lost")
        return APIError(500, f"the replicas failed on this request: {_short(e)}", None, None, "server_error")

    async def answer(self, chat):
        import ray.exceptions

        retried = False
        while True:
            response = self.handle.answer.remote(chat)
            started = over = False
            try:
                async for piece in response:
                    if "error" in piece:
                        over = True
                        raise APIError(**piece["error"])
                    started = True
                    if "replica" in piece:
                        self.table[piece["replica"]["id"]] = piece["replica"]
                    yield piece
                over = True
                return
            except APIError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever Ray raises becomes an OpenAI error object
                over = True
                if isinstance(e, ray.exceptions.RayActorError) and not started and not retried:
                    retried = True   # it had done nothing yet: send it to another replica, once
                    continue
                raise self._error(e) from None
            finally:
                if not over:   # closed early (client gone, timeout): the replica stops the job
                    response.cancel()


class _IngressASGI:
    """The ASGI app Ray Serve's proxy calls on the ingress replica: it forwards to the FastAPI app that replica
    built in its constructor (``Ingress.http_app``; ``app`` is a name Ray's wrapper owns). Lifespan events are
    answered here."""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        from ray import serve

        await serve.get_replica_context().servable_object.http_app(scope, receive, send)


class Ingress:
    """The HTTP front of the replicas: ``mmspec.server.app`` on a ``ReplicaBackend``."""

    async def __init__(self, engines, options: ReplicaOptions):
        from mmspec.server.app import backend_app

        card = await engines.describe.remote()    # waits for the first engine replica to load
        self.options = options
        self.http_app = backend_app(ReplicaBackend(engines, card, options), options.server)

    def info(self) -> dict:
        state = self.http_app.state.mmspec
        return {"model_id": state.config.model_id, "drafter_kind": state.card["drafter_kind"],
                "device": state.card["device"], "in_flight": len(state.in_flight)}

    async def drain(self, timeout_s: float = DRAIN_S) -> int:
        """Refuse new requests (503) and wait up to ``timeout_s`` for those in flight; returns how many are left."""
        state = self.http_app.state.mmspec
        state.draining = True
        deadline = time.monotonic() + timeout_s
        while state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(state.in_flight)


def application(options: ReplicaOptions):
    """The Ray Serve application (``serve.run`` it): the ingress bound to the engine deployment."""
    _, serve = import_serve()
    engine_options: dict[str, Any] = dict(
        name="engine", ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus},
        max_ongoing_requests=options.max_ongoing, health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=60, graceful_shutdown_timeout_s=DRAIN_S)
    if options.max_replicas is not None and options.max_replicas > options.replicas:
        engine_options["autoscaling_config"] = {"min_replicas": options.replicas, "max_replicas": options.max_replicas,
                                                "target_ongoing_requests": options.batch_size}
    else:
        engine_options["num_replicas"] = options.replicas
    engine = serve.deployment(EngineReplica, **engine_options).bind(options)
    ingress = serve.deployment(serve.ingress(_IngressASGI())(Ingress), name="ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING,
                               graceful_shutdown_timeout_s=DRAIN_S + 5)
    return ingress.bind(engine, options)


# ----------------------------------------------------------------------------------------------------------
# running it
# ----------------------------------------------------------------------------------------------------------
def connect(options: ReplicaOptions, address: str | None = None, quiet: bool = False) -> bool:
    """Join the Ray cluster ``address`` (or ``$RAY_ADDRESS``), else start a local one sized for the replicas;
    returns whether a local one was started (and so is ours to shut down). Nothing when Ray is already up."""
    ray, _ = import_serve()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=not quiet)
        return False
    replicas = options.max_replicas or options.replicas
    cpus = max(os.cpu_count() or 1, math.ceil(replicas * options.cpus_per_replica) + 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=not quiet)
    return True


def deploy(options: ReplicaOptions, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, quiet: bool = False) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (a Serve already running keeps its own) and run the application;
    returns its base URL once every replica is up."""
    _, serve = import_serve()
    if quiet:
        import logging

        logging.getLogger("ray.serve").setLevel(logging.WARNING)   # this process's "Deploying ..." lines
    serve.start(http_options={"host": host, "port": port})
    log = {"log_level": "WARNING" if quiet else "INFO", "enable_access_log": not quiet}
    try:
        serve.run(application(options), name=options.app_name, route_prefix=options.route_prefix,
                  logging_config=log)
    except Exception as e:  # noqa: BLE001 - a replica that cannot load its model, a prefix in use ...
        raise MMSpecError(f"the replicas did not start: {_short(e)}") from None
    try:  # the proxy's own address, which a Serve started earlier on this cluster may have chosen
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:  # noqa: BLE001 - a private API: fall back to what was asked for
        pass
    prefix = options.route_prefix.rstrip("/")
    return f"http://{host}:{port}{prefix}"


def drain(options: ReplicaOptions, timeout_s: float = DRAIN_S) -> int:
    """Tell the ingress to refuse new requests and wait for the ones in flight; returns how many were left."""
    _, serve = import_serve()
    try:
        return int(serve.get_app_handle(options.app_name).drain.remote(timeout_s).result(timeout_s=timeout_s + 15))
    except Exception:  # noqa: BLE001 - an application already gone has nothing to drain
        return 0


def undeploy(options: ReplicaOptions, started_ray: bool) -> None:
    ray, serve = import_serve()
    try:
        serve.delete(options.app_name)
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()


class ReplicaServer:
    """The replicas deployed on the running Ray (a local one is started if none is): ``url``, ``stop()``. For
    tests and the load test; ``serve_replicas`` is the command-line path."""

    def __init__(self, options: ReplicaOptions, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 ray_address: str | None = None, quiet: bool = True):
        self.options = options
        self.started_ray = connect(options, ray_address, quiet=quiet)
        try:
            self.url = deploy(options, host, port, quiet=quiet)
        except BaseException:
            if self.started_ray:
                undeploy(options, True)
            raise

    def stop(self, drain_s: float = DRAIN_S) -> int:
        left = drain(self.options, drain_s)
        undeploy(self.options, self.started_ray)
        return left

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def serve_replicas(options: ReplicaOptions, host: str, port: int, ray_address: str | None = None,
                   quiet: bool = False) -> int:
    """``mmspec serve --replicas N``: deploy, serve until SIGTERM or Ctrl-C, drain, stop."""
    _, serve = import_serve()
    say = (lambda text: print(f"mmspec serve: {text}", file=sys.stderr, flush=True))
    say(f"starting {options.replicas} replica(s) on Ray "
        f"({ray_address or os.environ.get('RAY_ADDRESS') or 'a local instance'}) ...")
    started_ray = connect(options, ray_address, quiet=quiet)
    # after ray.init, which installs a SIGTERM handler of its own (it would end this process undrained)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    left = 0
    try:
        url = deploy(options, host, port, quiet=quiet)
        info = serve.get_app_handle(options.app_name).info.remote().result()
        say(f"model {info['model_id']!r} (drafter {info['drafter_kind']}, {info['device']}) on "
            f"{options.replicas}{f'..{options.max_replicas}' if options.max_replicas else ''} replica(s) at "
            f"{url}/v1{' (API key required)' if options.server.api_key else ''}; Ctrl-C or SIGTERM drains and stops")
        while not stop.wait(0.5):
            pass
        say(f"draining: new requests get 503, requests in flight get up to {DRAIN_S:g} s to finish ...")
        left = drain(options)
    finally:
        try:
            undeploy(options, started_ray)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    say("stopped" + (f"; {left} request(s) did not finish in time" if left else ""))
    return 0
