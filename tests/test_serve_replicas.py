"""``mmspec serve --replicas N`` (mmspec/server/replicas.py): two CPU replicas of the bundled pair on a local Ray
Serve, loopback only. Answers equal ``pipe.generate``'s; ``/metrics`` (parsed with prometheus-client's parser)
moves by exactly what the responses report, over both replicas; ``/health`` is open and ``/v1`` closed under an
API key; 503 past the queue bound; a killed replica's requests fail cleanly (503, OpenAI's error object) while
the next ones succeed and Ray Serve replaces it; SIGTERM on ``mmspec serve --replicas 2`` drains every replica.

One Ray instance and one deployment serve the whole module (the SIGTERM test deploys its own application, as a
separate ``mmspec serve`` process joining the same Ray with ``--ray-address``)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytest.importorskip("ray.serve")

import mmspec  # noqa: E402
from mmspec.server.config import ServerConfig  # noqa: E402
from mmspec.server.loadtest import free_port  # noqa: E402
from mmspec.server.replicas import ReplicaOptions, ReplicaServer  # noqa: E402
from tests.test_server import (ANSWERS, IMAGES, MAX_TOKENS, MODEL, ROOT, _check_error, _wait_healthy,  # noqa: E402
                               check_metrics_moved, data_url, metric, prompt_for, scrape, sigterm_while_streaming,
                               user_message)

KEY = "replica-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BATCH = 2                # rows per replica: four requests fill both replicas exactly
MAX_WAITING = 2
SLOW_TOKENS = 40         # a request asking for exactly this many tokens runs at SLOW_ROUND_S per round (test hook)
SLOW_ROUND_S = 0.25


def slowing_hook(tokens: int, delay: float):
    """A replica ``setup`` that slows the rounds of requests asking for ``tokens`` tokens (defined in a function,
    so Ray pickles it by value and the replicas need not import this module)."""

    def setup(pipe):
        import time

        from mmspec.engine import Engine

        step = Engine.step

        def slowed(self):
            if any(j.config.max_new_tokens == tokens for j in list(self.active.values()) + list(self.queue)):
                time.sleep(delay)
            return step(self)

        Engine.step = slowed

    return setup


@pytest.fixture(scope="module")
def ray_serve():
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"address": ray.get_runtime_context().gcs_address, "port": port}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def pipe():
    return mmspec.load()


@pytest.fixture(scope="module")
def refs(pipe):
    return {i: pipe.generate(IMAGES[i], prompt_for(i), max_new_tokens=MAX_TOKENS) for i in range(8)}


@pytest.fixture(scope="module")
def urls():
    return [data_url(p) for p in IMAGES]


@pytest.fixture(scope="module")
def replicas(ray_serve, refs):
    # replica_queue=0: a replica holds no more than its batch, so four requests fill both replicas exactly
    options = ReplicaOptions(replicas=2, batch_size=BATCH, replica_queue=0, app_name="mmspec-test",
                             server=ServerConfig(api_key=KEY, max_waiting=MAX_WAITING),
                             setup=slowing_hook(SLOW_TOKENS, SLOW_ROUND_S))
    server = ReplicaServer(options, port=ray_serve["port"])
    yield server
    server.stop(drain_s=5)


def caption(i: int) -> str:
    """Image i's caption prompt: the long answers (a question's answer may be one word)."""
    return ANSWERS[IMAGES[i].name]["prompts"][0]["prompt"]


def engine_replicas(app: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#engine#"))


def chat(url: str, i: int, stream: bool = False, **settings) -> tuple[int, str, dict | None, dict]:
    """One request for image i: (status, answer text, mmspec stats, last error or usage)."""
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": stream,
            "messages": [user_message(data_url(IMAGES[i]), prompt_for(i))], **settings}
    if stream:
        body["stream_options"] = {"include_usage": True}
        parts, stats, tail = [], None, {}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
            if r.status_code != 200:
                return r.status_code, "", None, json.loads(r.read())
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return 200, "".join(parts), None, data
                parts += [c["delta"].get("content") or "" for c in data["choices"]]
                stats = data.get("mmspec") or stats
                tail = data.get("usage") or tail
        return 200, "".join(parts), stats, tail
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    if r.status_code != 200:
        return r.status_code, "", None, r.json()
    data = r.json()
    return 200, data["choices"][0]["message"]["content"], data["mmspec"], data["usage"]


def test_two_replicas_answer_like_generate_and_metrics_add_up(replicas, refs):
    before = scrape(replicas.url, AUTH)
    N = 2 * BATCH + MAX_WAITING    # as many as are admitted at once
    with ThreadPoolExecutor(N) as pool:
        results = list(pool.map(lambda i: chat(replicas.url, i, stream=i % 2 == 1), range(N)))
    assert [r[:2] for r in results] == [(200, refs[i].text) for i in range(N)]
    assert len({r[2]["replica"] for r in results}) == 2          # both replicas answered
    after = scrape(replicas.url, AUTH)
    finishes = [("stop" if refs[i].stats.stop_reason == "eos" else "length") for i in range(N)]
    check_metrics_moved(before, after, [r[2] for r in results], [r[3] for r in results],
                        {f: finishes.count(f) for f in set(finishes)})
    memory = {dict(lab)["replica"] for (n, lab), v in after.items()
              if n == "mmspec:replica_peak_memory_bytes" and v > 100 * 2**20}
    assert memory == {r[2]["replica"] for r in results}          # each replica's peak memory, reported
    assert metric(after, "mmspec:num_requests_running") == metric(after, "mmspec:num_requests_waiting") == 0


def test_health_open_and_v1_closed_under_the_key(replicas):
    url = replicas.url
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    health = httpx.get(f"{url}/health", headers={"Authorization": f"bearer {KEY}"}).json()
    assert health["model"] == MODEL and health["status"] == "ok"
    for path in ("/v1/models", "/metrics"):
        assert _check_error(httpx.get(f"{url}{path}"), 401)["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_queue_bound_gives_503(replicas):
    n = 2 * BATCH + MAX_WAITING + 3
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        return chat(replicas.url, i % 8, max_tokens=SLOW_TOKENS, num_draft_tokens=0)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * (2 * BATCH + MAX_WAITING) + [503] * 3
    assert all(r[3]["error"]["code"] == "queue_full" for r in results if r[0] == 503)


def test_killed_replica_fails_cleanly_and_is_replaced(replicas, pipe):
    import ray
    from ray import serve

    app = replicas.options.app_name
    names = engine_replicas(app)
    assert len(names) == 2
    slow = {i: pipe.generate(IMAGES[i], caption(i), max_new_tokens=SLOW_TOKENS, num_draft_tokens=0).text
            for i in range(4)}
    started = threading.Semaphore(0)

    def one(i):   # 2 * BATCH requests: each replica holds two; streamed and not
        if i % 2:
            body = {"model": MODEL, "max_tokens": SLOW_TOKENS, "num_draft_tokens": 0, "stream": True,
                    "messages": [user_message(data_url(IMAGES[i]), caption(i))]}
            parts = []
            with httpx.stream("POST", f"{replicas.url}/v1/chat/completions", json=body, headers=AUTH,
                              timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        data = json.loads(line[6:])
                        if "error" in data:
                            return "error", data
                        if not parts:
                            started.release()
                        parts += [c["delta"].get("content") or "" for c in data["choices"]]
            return "".join(parts), None
        started.release()
        r = httpx.post(f"{replicas.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
            "model": MODEL, "max_tokens": SLOW_TOKENS, "num_draft_tokens": 0,
            "messages": [user_message(data_url(IMAGES[i]), caption(i))]})
        return (r.json()["choices"][0]["message"]["content"], None) if r.status_code == 200 else ("error", r)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        for _ in range(4):
            assert started.acquire(timeout=120)
        time.sleep(6 * SLOW_ROUND_S)   # every request is in a batch and has had its first round
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        t0 = time.monotonic()
        results = [f.result(timeout=120) for f in futures]
    assert time.monotonic() - t0 < 30        # no hang
    failed = [(i, detail) for i, (text, detail) in enumerate(results) if text == "error"]
    assert len(failed) == BATCH, results      # the killed replica's two requests
    for i, detail in failed:
        err = detail["error"] if isinstance(detail, dict) else _check_error(detail, 503)
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "replica_lost", err
        if not isinstance(detail, dict):
            assert detail.headers["retry-after"] == "1"
    for i, (text, _) in enumerate(results):
        if text != "error":
            assert text == slow[i]
    # the next requests succeed at once (the survivor answers), and Ray Serve brings a new replica up
    for i in range(4):
        assert chat(replicas.url, i)[0] == 200
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        deployment = serve.status().applications[app].deployments["engine"]
        if deployment.replica_states.get("RUNNING") == 2 and names[0] not in engine_replicas(app):
            break
        time.sleep(0.5)
    assert serve.status().applications[app].deployments["engine"].replica_states.get("RUNNING") == 2
    assert len(engine_replicas(app)) == 2 and names[0] not in engine_replicas(app)
    samples = scrape(replicas.url, AUTH)
    assert metric(samples, "mmspec:requests_total", outcome="failed") >= BATCH


def test_sigterm_drains_every_replica(ray_serve, refs, urls, tmp_path):
    from ray import serve

    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mmspec.server", "--replicas", "2", "--batch-size", "2",
                             "--ray-address", ray_serve["address"], "--app-name", "sigterm", "--route-prefix",
                             "/sigterm", "--log-level", "warning"], cwd=ROOT, stderr=log, text=True)
    url = f"http://127.0.0.1:{ray_serve['port']}/sigterm"
    try:
        _wait_healthy(url, proc, timeout=240)
        assert len(engine_replicas("sigterm")) == 2
        sigterm_while_streaming(url, proc, urls, refs, n=8, started_before=3)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "sigterm" not in serve.status().applications and not engine_replicas("sigterm")
