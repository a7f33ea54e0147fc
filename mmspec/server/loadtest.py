"""``mmspec serve --load-test``: throughput and latency percentiles at 1, 4, 16 and 64 concurrent clients on
loopback, printed as a markdown table; either in one process, drafting on and off, or (``--load-replicas
1,2``) on N Ray Serve replicas for each N given, with each replica's peak memory. And ``RunningServer``, the
background uvicorn server it (and the tests) talk to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from pathlib import Path

from mmspec.errors import MMSpecError
from mmspec.server.app import build_app
from mmspec.server.backend import served_model_id
from mmspec.server.config import DEFAULT_HOST, ServerConfig
from mmspec.server.images import data_url

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "assets" / "images"
MIB = 2**20


class RunningServer:
    """A uvicorn server on a background thread (tests, the load test): ``url``, ``stop()``."""

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="mmspec-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise MMSpecError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.host, self.port = bound[0], bound[1]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def _one_streamed_request(client, url: str, body: dict) -> dict:
    """POST one streamed chat completion; latency, time to the first content and the final usage/stats."""
    t0 = time.perf_counter()
    first = None
    usage, extra = {}, {}
    with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise MMSpecError(f"the server answered {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise MMSpecError(f"the server failed a request: {data['error']['message']}")
            if first is None and data["choices"] and data["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            usage = data.get("usage") or usage
            extra = data.get("mmspec") or extra
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": first if first is not None else latency,
            "tokens": usage.get("completion_tokens", 0), "stats": extra}


def peak_memory_by_replica(base_url: str) -> dict[str, float]:
    """Each replica's peak host memory in MiB, read from the server's ``/metrics``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "mmspec:replica_peak_memory_bytes":
            for s in family.samples:
                if s.labels.get("memory") == "host":
                    out[s.labels["replica"]] = s.value / MIB
    return out


class _Levels:
    """One server under test: warm it up, then run each concurrency level against it."""

    def __init__(self, base_url: str, model: str, urls: list[str], prompt: str, max_tokens: int):
        import httpx

        self.endpoint = f"{base_url}/v1/chat/completions"
        self.model, self.urls, self.prompt, self.max_tokens = model, urls, prompt, max_tokens
        self.client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=256))

    def body(self, i: int, max_tokens: int | None = None) -> dict:
        return {"model": self.model, "max_tokens": max_tokens or self.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": self.urls[i % len(self.urls)]}},
                    {"type": "text", "text": self.prompt}]}]}

    def warm_up(self, copies: int = 1) -> None:
        """Every image at least once per replica (``copies``), so image caches are warm: this measures decoding."""
        from concurrent.futures import ThreadPoolExecutor

        n = len(self.urls) * copies
        with ThreadPoolExecutor(min(n, 32)) as pool:
            list(pool.map(lambda i: _one_streamed_request(self.client, self.endpoint, self.body(i, 2)), range(n)))

    def run(self, clients: int, requests: int) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(lambda i: _one_streamed_request(self.client, self.endpoint, self.body(i)),
                                 range(requests)))
        wall = time.perf_counter() - t0
        lat, ttft = [d["latency"] for d in done], [d["ttft"] for d in done]
        tokens = sum(d["tokens"] for d in done)
        forwards = sum(d["stats"].get("target_forwards", 0) for d in done)
        return {"clients": clients, "requests": len(done), "tokens": tokens, "wall_s": wall,
                "tokens_per_s": tokens / wall, "requests_per_s": len(done) / wall, "p50_s": _percentile(lat, 50),
                "p95_s": _percentile(lat, 95), "p99_s": _percentile(lat, 99), "ttft_p50_s": _percentile(ttft, 50),
                "mean_accepted": tokens / forwards if forwards else 0.0}

    def close(self) -> None:
        self.client.close()


def _print_table(rows: list[dict], out) -> None:
    out("| replicas | drafting | clients | requests | tokens | tokens/s | requests/s | latency p50 (s) | p95 (s) "
        "| p99 (s) | first token p50 (s) | tokens per target forward | peak memory per replica (MiB) |")
    out("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        memory = ", ".join(f"{v:.0f}" for v in r.get("peak_mib", [])) or "-"
        out(f"| {r['replicas']} | {r['drafting']} | {r['clients']} | {r['requests']} | {r['tokens']} | "
            f"{r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
            f"{r['p99_s']:.3f} | {r['ttft_p50_s']:.3f} | {r['mean_accepted']:.2f} | {memory} |")


def _machine() -> str:
    import platform

    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads here)")


def load_test(pipe=None, concurrency=(1, 4, 16, 64), drafting=(True, False), requests_per_level: int = 64,
              max_tokens: int = 64, prompt: str = "Describe the image.", images=None, out=print,
              replicas: tuple[int, ...] | None = None, replica_options=None) -> list[dict]:
    """Throughput and latency of the server on loopback at each number of concurrent clients, as a markdown
    table; returns one row (dict) per setting and level.

    In one process (``replicas=None``): drafting on (the pipeline's drafter) and off (``drafter_kind="none"`` on
    the same target), each side on its own server. With ``replicas=(1, 2)``: the application of
    ``mmspec.server.replicas`` with that many replicas (``replica_options`` gives the model and resources; a local
    Ray is started if none is up), the model loaded in the replicas only. Each server gets warm-up requests first
    (every image, so image caches are warm: this measures decoding), then ``requests_per_level`` streamed,
    greedy requests spread over the clients."""
    import mmspec

    if requests_per_level < 1 or max_tokens < 1 or not concurrency or any(c < 1 for c in concurrency):
        raise MMSpecError("load_test needs requests_per_level >= 1, max_tokens >= 1 and client counts >= 1")
    if images is None:
        images = sorted(str(p) for p in SAMPLE_IMAGES.glob("*.png"))
    urls = [data_url(p) for p in images]
    rows: list[dict] = []
    if replicas:
        header = _replicas_axis(rows, tuple(replicas), replica_options, concurrency, requests_per_level, max_tokens,
                                prompt, urls)
    else:
        pipe = pipe or mmspec.load()
        for on in drafting:
            side = pipe if on else pipe.with_drafter_kind("none", own_vision_cache=True)
            app = build_app(side)
            with RunningServer(app) as server:
                levels = _Levels(server.url, app.state.mmspec.config.model_id, urls, prompt, max_tokens)
                try:
                    levels.warm_up()
                    for c in concurrency:
                        rows.append(dict(levels.run(c, requests_per_level), replicas="in-process",
                                         drafting=side.drafter_kind))
                    memory = peak_memory_by_replica(server.url)
                    for row in rows[-len(concurrency):]:
                        row["peak_mib"] = list(memory.values())
                finally:
                    levels.close()
        header = (f"device {pipe.adapter.device}, target {served_model_id(pipe)}, engine batch "
                  f"{pipe.default_batch_size}, one process")
    out(f"mmspec serve load test: {_machine()}, {header}, {requests_per_level} streamed greedy requests per level, "
        f"max_tokens {max_tokens}, prompt {prompt!r}, {len(urls)} images")
    out("")
    _print_table(rows, out)
    return rows


def _replicas_axis(rows, counts, options, concurrency, requests_per_level, max_tokens, prompt, urls) -> str:
    from mmspec.server import replicas as ray_replicas

    options = options or ray_replicas.ReplicaOptions()
    _, serve = ray_replicas.import_serve()
    started = ray_replicas.connect(options, quiet=True)
    port = free_port()
    try:
        for n in counts:
            run = dataclasses.replace(options, replicas=n, max_replicas=None, server=ServerConfig(),
                                      app_name=f"mmspec-load-{n}")
            url = ray_replicas.deploy(run, DEFAULT_HOST, port, quiet=True)
            card = serve.get_app_handle(run.app_name).info.remote().result()
            levels = _Levels(url, card["model_id"], urls, prompt, max_tokens)
            try:
                levels.warm_up(copies=2 * n)
                first = len(rows)
                for c in concurrency:
                    rows.append(dict(levels.run(c, requests_per_level), replicas=n, drafting=card["drafter_kind"]))
                memory = peak_memory_by_replica(url)
                for row in rows[first:]:
                    row["peak_mib"] = sorted(memory.values())
            finally:
                levels.close()
                ray_replicas.drain(run, 10)
                serve.delete(run.app_name)
    finally:
        if started:
            serve.shutdown()
            import ray

            ray.shutdown()
    device = options.device
    return (f"Ray Serve replicas on one machine, {options.cpus_per_replica:g} CPU(s) and {options.gpus:g} GPU(s) "
            f"per replica, device {device}, engine batch {options.batch_size} per replica")
