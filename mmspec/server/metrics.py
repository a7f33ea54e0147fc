"""``GET /metrics``: Prometheus metrics of one server, in its own ``CollectorRegistry`` (several apps may live in
one process: tests build many).

The speculative counters carry vLLM's names under the ``mmspec:`` prefix, so dashboards built for
``vllm:spec_decode_*`` work with the prefix changed: ``mmspec:spec_decode_num_drafts_total`` (rounds that
drafted), ``..._num_draft_tokens_total``, ``..._num_accepted_tokens_total`` and
``..._num_accepted_tokens_per_pos_total{position}``. Besides: requests by outcome, prompt and generated tokens,
histograms of time to first token, time per output token and end-to-end latency (as the server sees them:
from the request's arrival), and gauges of running and waiting requests, rows in the engines' batches and each
replica's peak memory.

Everything is fed from the pieces each request's answer arrives in (``mmspec.server.backend``), which is what
makes the figures add up over replicas: every replica's pieces pass through the one ingress that serves
``/metrics``. Nothing here touches the engine.
"""

from __future__ import annotations

import threading
from typing import Callable

OUTCOMES = ("stop", "length", "client_gone", "timeout", "rejected", "invalid", "failed")
# as vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class ServerMetrics:
    """The counters, histograms and gauges of one server. ``load()`` is read at each scrape and returns
    ``(running, waiting, replica snapshots)``."""

    def __init__(self, model_name: str, load: Callable[[], tuple[int, int, list[dict]]]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.model = model_name
        self.load = load
        self.lock = threading.Lock()
        m = ["model_name"]
        self.drafts = Counter("mmspec:spec_decode_num_drafts", "Speculative rounds that drafted at least one token.",
                              m, registry=r)
        self.draft_tokens = Counter("mmspec:spec_decode_num_draft_tokens", "Draft tokens proposed (tree nodes "
                                    "included).", m, registry=r)
        self.accepted = Counter("mmspec:spec_decode_num_accepted_tokens", "Draft tokens the target accepted.", m,
                                registry=r)
        self.per_pos = Counter("mmspec:spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by position "
                               "in the draft (0 = the first drafted token).", m + ["position"], registry=r)
        self.requests = Counter("mmspec:requests", "Chat completion requests by outcome: stop, length (answered), "
                                "client_gone, timeout, rejected (503, queue full or draining), invalid (4xx), failed "
                                "(5xx).", m + ["outcome"], registry=r)
        self.prompt_tokens = Counter("mmspec:prompt_tokens", "Prompt tokens of answered requests (image placeholders "
                                     "included).", m, registry=r)
        self.generation_tokens = Counter("mmspec:generation_tokens", "Tokens generated in answered requests.", m,
                                         registry=r)
        self.ttft = Histogram("mmspec:time_to_first_token_seconds", "From a request's arrival to its first round's "
                              "tokens.", m, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("mmspec:time_per_output_token_seconds", "Mean time per output token after the first, "
                              "per answered request.", m, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("mmspec:e2e_request_latency_seconds", "From a request's arrival to its last token.", m,
                             buckets=E2E_BUCKETS, registry=r)
        self.running = Gauge("mmspec:num_requests_running", "Requests decoding: in flight, up to the rows of the "
                             "batches (--batch-size x replicas).", m, registry=r)
        self.waiting = Gauge("mmspec:num_requests_waiting", "Requests in flight beyond the rows of the batches: they "
                             "wait for a row (bounded by --max-waiting).", m, registry=r)
        self.batch = Gauge("mmspec:batch_size", "Rows in the engines' batches, as the replicas last reported.", m,
                           registry=r)
        self.memory = Gauge("mmspec:replica_peak_memory_bytes", "Peak memory of each replica: host (resident set) "
                            "and device (CUDA memory torch allocated).", m + ["replica", "memory"], registry=r)
        for outcome in OUTCOMES:   # every outcome present from the start, at 0
            self.requests.labels(model_name, outcome)
        for c in (self.drafts, self.draft_tokens, self.accepted, self.prompt_tokens, self.generation_tokens,
                  self.ttft, self.tpot, self.e2e):
            c.labels(model_name)

    def spec(self, figures: list | None) -> None:
        """Add one piece's speculative figures ``[drafts, draft_tokens, accepted, [per position...]]``."""
        if not figures:
            return
        drafts, tokens, accepted, per_pos = figures
        m = self.model
        with self.lock:
            if drafts:
                self.drafts.labels(m).inc(drafts)
            if tokens:
                self.draft_tokens.labels(m).inc(tokens)
            if accepted:
                self.accepted.labels(m).inc(accepted)
            for pos, n in enumerate(per_pos):
                if n:
                    self.per_pos.labels(m, str(pos)).inc(n)

    def finished(self, outcome: str, e2e_s: float, ttft_s: float | None = None, usage: dict | None = None) -> None:
        """One request ended with ``outcome``; an answered one also gives its latencies and token counts."""
        m = self.model
        with self.lock:
            self.requests.labels(m, outcome).inc()
            if usage is None:
                return
            self.prompt_tokens.labels(m).inc(usage["prompt_tokens"])
            self.generation_tokens.labels(m).inc(usage["completion_tokens"])
            self.e2e.labels(m).observe(e2e_s)
            if ttft_s is not None:
                self.ttft.labels(m).observe(ttft_s)
                if usage["completion_tokens"] > 1:
                    self.tpot.labels(m).observe((e2e_s - ttft_s) / (usage["completion_tokens"] - 1))

    def render(self) -> bytes:
        """The exposition text (``text/plain; version=0.0.4``), gauges read now."""
        from prometheus_client import generate_latest

        running, waiting, replicas = self.load()
        m = self.model
        with self.lock:
            self.running.labels(m).set(running)
            self.waiting.labels(m).set(waiting)
            self.batch.labels(m).set(sum(int(s.get("rows", 0)) for s in replicas))
            self.memory.clear()
            for s in replicas:
                self.memory.labels(m, s["id"], "host").set(s.get("peak_host_bytes", 0))
                if s.get("peak_device_bytes"):
                    self.memory.labels(m, s["id"], "device").set(s["peak_device_bytes"])
            return generate_latest(self.registry)
