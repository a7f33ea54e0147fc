"""``mmspec serve --load-test``: throughput and latency percentiles at 1, 4 and 16 concurrent clients on loopback,
drafting on and off, printed as a markdown table; and ``RunningServer``, the background uvicorn server it (and
the tests) talk to.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from mmspec.errors import MMSpecError
from mmspec.server.app import DEFAULT_HOST, build_app, served_model_id
from mmspec.server.images import data_url

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "assets" / "images"


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


def _print_table(rows: list[dict], out) -> None:
    out("| drafting | clients | requests | tokens | tokens/s | requests/s | latency p50 (s) | p90 (s) | p99 (s) "
        "| first token p50 (s) | tokens per target forward |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        out(f"| {r['drafting']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | "
            f"{r['requests_per_s']:.2f} | {r['p50_s']:.3f} | {r['p90_s']:.3f} | {r['p99_s']:.3f} | "
            f"{r['ttft_p50_s']:.3f} | {r['mean_accepted']:.2f} |")


def load_test(pipe=None, concurrency=(1, 4, 16), drafting=(True, False), requests_per_level: int = 64,
              max_tokens: int = 64, prompt: str = "Describe the image.", images=None, out=print) -> list[dict]:
    """Throughput and latency of the server on loopback at each number of concurrent clients, drafting on (the
    pipeline's drafter) and off (``drafter_kind="none"`` on the same target), as a markdown table.

    Each setting gets its own server on a free port; one warm-up request per image first (so the image cache is
    warm on both sides: this measures decoding, not image encoding), then ``requests_per_level`` streamed,
    greedy requests spread over the clients. Returns one row (dict) per (drafting, clients)."""
    import platform
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import torch

    import mmspec

    if requests_per_level < 1 or max_tokens < 1 or not concurrency or any(c < 1 for c in concurrency):
        raise MMSpecError("load_test needs requests_per_level >= 1, max_tokens >= 1 and client counts >= 1")
    pipe = pipe or mmspec.load()
    if images is None:
        images = sorted(str(p) for p in SAMPLE_IMAGES.glob("*.png"))
    urls = [data_url(p) for p in images]
    rows = []
    for on in drafting:
        side = pipe if on else pipe.with_drafter_kind("none", own_vision_cache=True)
        app = build_app(side)
        model = app.state.mmspec.config.model_id
        with RunningServer(app) as server, httpx.Client(timeout=600) as client:
            endpoint = f"{server.url}/v1/chat/completions"

            def body(i: int) -> dict:
                return {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                            {"type": "text", "text": prompt}]}]}

            for i in range(len(urls)):
                _one_streamed_request(client, endpoint, dict(body(i), max_tokens=2))
            for c in concurrency:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    done = list(pool.map(lambda i: _one_streamed_request(client, endpoint, body(i)),
                                         range(requests_per_level)))
                wall = time.perf_counter() - t0
                lat, ttft = [d["latency"] for d in done], [d["ttft"] for d in done]
                tokens = sum(d["tokens"] for d in done)
                forwards = sum(d["stats"].get("target_forwards", 0) for d in done)
                rows.append({"drafting": side.drafter_kind, "clients": c, "requests": len(done), "tokens": tokens,
                             "wall_s": wall, "tokens_per_s": tokens / wall, "requests_per_s": len(done) / wall,
                             "p50_s": _percentile(lat, 50), "p90_s": _percentile(lat, 90),
                             "p99_s": _percentile(lat, 99), "ttft_p50_s": _percentile(ttft, 50),
                             "mean_accepted": tokens / forwards if forwards else 0.0})
    out(f"mmspec serve load test: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), device {pipe.adapter.device}, target "
        f"{served_model_id(pipe)}, {requests_per_level} streamed greedy requests per level, max_tokens "
        f"{max_tokens}, prompt {prompt!r}, {len(urls)} images, engine batch {pipe.default_batch_size}")
    out("")
    _print_table(rows, out)
    return rows
