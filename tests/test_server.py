"""``mmspec serve`` (mmspec/server/): a real uvicorn server on a free loopback port, spoken to with the real
``openai`` client (httpx for what a client library would not send). Answers equal ``pipe.generate``'s text,
streamed or not, for one client or 16 at once; every bad input gets an OpenAI-style 4xx and the server keeps
answering; the API key is enforced; a client that goes away frees its row. Bundled pair, CPU, offline."""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

import mmspec
from mmspec.errors import MMSpecError
from mmspec.server import RunningServer, build_app, data_url, load_test, resolve_api_key

ROOT = Path(__file__).resolve().parent.parent
IMAGES = sorted((ROOT / "assets" / "images").glob("*.png"))[:16]
ANSWERS = {a["file"]: a for a in json.loads((ROOT / "assets" / "images" / "answers.json").read_text())}
MAX_TOKENS = 16
MODEL = "mmspec-bundled"
MAX_BODY = 1 << 20
MAX_IMAGE = 256 << 10
ERROR_KEYS = {"message", "type", "param", "code"}


def prompt_for(i: int) -> str:
    """Image i's prompt: captions and the scene's own questions, in turn."""
    prompts = ANSWERS[IMAGES[i].name]["prompts"]
    return prompts[0]["prompt"] if i % 2 == 0 else prompts[1 + i // 2 % 3]["prompt"]


def user_message(image_url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def pipe():
    return mmspec.load()


@pytest.fixture(scope="module")
def refs(pipe):
    """pipe.generate's answer for each (image, prompt), computed before any request reaches the server."""
    return {i: pipe.generate(IMAGES[i], prompt_for(i), max_new_tokens=MAX_TOKENS) for i in range(len(IMAGES))}


@pytest.fixture(scope="module")
def server(pipe, refs):
    with RunningServer(build_app(pipe, max_body_bytes=MAX_BODY, max_image_bytes=MAX_IMAGE)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def urls():
    return [data_url(p) for p in IMAGES]


def ask(client, urls, i: int, stream: bool = False, **kwargs):
    """Image i's question through the openai client: (text, finish_reason, usage, mmspec stats)."""
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    messages = [user_message(urls[i], prompt_for(i))]
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage, r.model_extra["mmspec"]
    parts, finish, usage, stats = [], None, None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        assert chunk.object == "chat.completion.chunk" and chunk.model == MODEL
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            stats = (chunk.model_extra or {}).get("mmspec") or stats
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(parts), finish, usage, stats


# ----- happy paths -------------------------------------------------------------------------------------
def test_models_and_health(server, client, pipe):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["drafter_kind"] == pipe.drafter_kind


def test_non_streamed_answer_equals_generate(client, urls, refs):
    text, finish, usage, stats = ask(client, urls, 0)
    ref = refs[0]
    assert text == ref.text
    assert finish == ("stop" if ref.stats.stop_reason == "eos" else "length")
    assert usage.completion_tokens == len(ref.token_ids)
    assert usage.prompt_tokens == len(ref.prompt_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert stats["target_forwards"] >= 1 and 0 <= stats["accepted_tokens"] <= stats["drafted_tokens"]
    assert stats["drafter_kind"] == "eagle"   # the bundled default


def test_streamed_answer_equals_generate(client, urls, refs):
    for i in (0, 1):
        text, finish, usage, stats = ask(client, urls, i, stream=True)
        assert text == refs[i].text
        assert finish in ("stop", "length")
        assert usage.completion_tokens == len(refs[i].token_ids)
        assert stats["target_forwards"] >= 1


def test_stream_wire_format(server, urls, refs):
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": True,
            "messages": [user_message(urls[0], prompt_for(0))]}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == refs[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "mmspec" in chunks[-1]


def test_default_settings_and_max_completion_tokens(client, urls, refs, pipe):
    # no max_tokens: up to end-of-sequence (within the context); max_completion_tokens wins over max_tokens
    text, finish, *_ = ask(client, urls, 0, max_tokens=None)
    full = pipe.generate(IMAGES[0], prompt_for(0), max_new_tokens=pipe.adapter.context_length)
    assert text == full.text and finish == "stop"
    text, *_ = ask(client, urls, 0, max_tokens=3, max_completion_tokens=MAX_TOKENS)
    assert text == refs[0].text


def test_stop_strings(client, urls, pipe):
    full = pipe.generate(IMAGES[0], prompt_for(0), max_new_tokens=40).text
    word = full.split()[3]
    expected = full[:full.find(word)]
    for stream in (False, True):
        text, finish, usage, _ = ask(client, urls, 0, stream=stream, max_tokens=40, stop=[word, "zzz-never"])
        assert (text, finish) == (expected, "stop")
        assert 0 < usage.completion_tokens < len(pipe.adapter.tokenizer(full, add_special_tokens=False).input_ids)


def test_conversation_and_sampling(client, urls):
    messages = [{"role": "system", "content": "You answer questions about shapes."},
                {"role": "user", "content": [{"type": "text", "text": "Describe the image."},
                                             {"type": "image_url", "image_url": {"url": urls[2]}}]},
                {"role": "assistant", "content": "some shapes."},
                {"role": "user", "content": "How many objects are there?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert isinstance(r.choices[0].message.content, str)
    a, b = (client.chat.completions.create(model=MODEL, messages=[user_message(urls[3], "Describe the image.")],
                                           max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
            .choices[0].message.content for _ in range(2))
    assert a == b  # the same seed, the same sample


def _chat_part(part: dict, pipe_side: bool) -> dict:
    """An OpenAI image_url part as the server gets it, or as pipe.chat takes the same image."""
    if part["type"] != "image_url":
        return part
    return {"type": "image", "url": part["image_url"]["url"]} if pipe_side else part


@pytest.mark.parametrize("shape", ["text only", "one image", "two images", "three turns"])
def test_images_and_turns_equal_pipe_chat(client, urls, pipe, shape):
    """0, 1 and 2 images and a multi-turn conversation: the server's answer equals pipe.chat's on the same
    conversation (rendered with the target's chat template), streamed or not."""
    img = [{"type": "image_url", "image_url": {"url": urls[i]}} for i in range(3)]
    text = {"type": "text", "text": "Describe the image."}
    messages = {"text only": [{"role": "user", "content": "Write one word."}],
                "one image": [{"role": "user", "content": [img[0], text]}],
                "two images": [{"role": "user", "content": [img[0], img[1], text]}],
                "three turns": [{"role": "system", "content": "You answer questions about shapes."},
                                {"role": "user", "content": [img[0], text]},
                                {"role": "assistant", "content": "a red circle."},
                                {"role": "user", "content": [img[2], {"type": "text", "text": "And this one?"}]}]
                }[shape]
    as_pipe = [dict(m, content=m["content"] if isinstance(m["content"], str)
                    else [_chat_part(p, True) for p in m["content"]]) for m in messages]
    ref = pipe.chat(as_pipe, max_new_tokens=MAX_TOKENS)
    assert ref.error is None and ref.token_ids
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stream=stream)
        if stream:
            got = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        else:
            got = r.choices[0].message.content
            assert r.usage.prompt_tokens == len(ref.prompt_ids)
        assert got == ref.text, (shape, stream)


def test_sixteen_concurrent_clients(client, urls, refs, pipe):
    engine = pipe._scheduler.engine
    step, peak = engine.step, [0]

    def counting_step():
        events = step()
        peak[0] = max(peak[0], len(engine.active))
        return events

    engine.step = counting_step
    barrier = threading.Barrier(len(IMAGES))

    def one(i):
        barrier.wait()
        return ask(client, urls, i, stream=i % 2 == 1)[0]

    try:
        with ThreadPoolExecutor(len(IMAGES)) as pool:
            answers = list(pool.map(one, range(len(IMAGES))))
    finally:
        del engine.step
    assert answers == [refs[i].text for i in range(len(IMAGES))]
    assert peak[0] > 1  # they shared the batch


# ----- bad input -------------------------------------------------------------------------------------------
def _b64(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _body(**overrides) -> dict:
    body = {"model": MODEL, "max_tokens": 4,
            "messages": [user_message(data_url(IMAGES[0]), "Describe the image.")]}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def _msgs(*content) -> list:
    return [{"role": "user", "content": list(content)}]


IMG = {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}}
TXT = {"type": "text", "text": "Describe the image."}

BAD_BODIES = {
    "unknown model": (_body(model="gpt-4o"), 404),
    "missing model": (_body(model=...), 400),
    "missing messages": (_body(messages=...), 400),
    "empty messages": (_body(messages=[]), 400),
    "messages not a list": (_body(messages="hi"), 400),
    "message not an object": (_body(messages=["hi"]), 400),
    "tool role": (_body(messages=[{"role": "tool", "content": "x"}]), 400),
    "too many images": (_body(messages=_msgs(*[IMG] * 9, TXT)), 400),
    "ends on an assistant turn": (_body(messages=_msgs(IMG, TXT) + [{"role": "assistant", "content": "x"}]), 400),
    "second image undecodable": (_body(messages=_msgs(IMG, {"type": "image_url", "image_url": {
        "url": _b64(b"not a png")}}, TXT)), 400),
    "image only, no text": (_body(messages=_msgs(IMG)), 400),
    "image in assistant turn": (_body(messages=[{"role": "assistant", "content": [IMG]},
                                                {"role": "user", "content": "hi"}]), 400),
    "audio part": (_body(messages=_msgs(IMG, TXT, {"type": "input_audio", "input_audio": {}})), 400),
    "image token in text": (_body(messages=_msgs(IMG, {"type": "text", "text": "<image> what?"})), 400),
    "undecodable image": (_body(messages=_msgs({"type": "image_url", "image_url": {"url": _b64(b"not a png")}},
                                               TXT)), 400),
    "truncated image": (_body(messages=_msgs({"type": "image_url", "image_url": {
        "url": _b64(IMAGES[0].read_bytes()[:300])}}, TXT)), 400),
    "bad base64": (_body(messages=_msgs({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                                        TXT)), 400),
    "data url not base64": (_body(messages=_msgs({"type": "image_url", "image_url": {"url": "data:,hello"}},
                                                 TXT)), 400),
    "remote url not allowed": (_body(messages=_msgs({"type": "image_url", "image_url": {
        "url": "http://127.0.0.1:9/x.png"}}, TXT)), 400),
    "file url": (_body(messages=_msgs({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, TXT)), 400),
    "oversized image": (_body(messages=_msgs({"type": "image_url", "image_url": {
        "url": _b64(os.urandom(MAX_IMAGE + 1024))}}, TXT)), 413),
    "prompt longer than the context": (_body(messages=_msgs(IMG, {"type": "text", "text": "red square " * 400})),
                                       400),
    "max_tokens 0": (_body(max_tokens=0), 400),
    "max_tokens not an integer": (_body(max_tokens="ten"), 400),
    "max_completion_tokens negative": (_body(max_completion_tokens=-1), 400),
    "temperature negative": (_body(temperature=-0.5), 400),
    "temperature too high": (_body(temperature=2.5), 400),
    "temperature a string": (_body(temperature="hot"), 400),
    "top_p 0": (_body(top_p=0), 400),
    "top_p above 1": (_body(top_p=1.5), 400),
    "n 2": (_body(n=2), 400),
    "seed negative": (_body(seed=-1), 400),
    "seed too large": (_body(seed=2**64), 400),
    "stop not a string": (_body(stop=3), 400),
    "too many stop strings": (_body(stop=["a", "b", "c", "d", "e"]), 400),
    "empty stop string": (_body(stop=[""]), 400),
    "stream not a bool": (_body(stream="yes"), 400),
    "logprobs": (_body(logprobs=True), 400),
    "tools": (_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    "body not an object": ([1, 2, 3], 400),
}


def _check_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"]
    return err


CODES = {"unknown model": "model_not_found", "too many images": "too_many_images",
         "second image undecodable": "invalid_image",
         "undecodable image": "invalid_image", "truncated image": "invalid_image", "bad base64": "invalid_image",
         "remote url not allowed": "remote_images_disabled", "oversized image": "image_too_large",
         "prompt longer than the context": "context_length_exceeded", "n 2": "invalid_value",
         "logprobs": "unsupported_parameter", "image only, no text": "empty_prompt"}


PARAMS = {"too many images": "messages", "ends on an assistant turn": "messages[1]",
          "second image undecodable": "messages[0].content[1]", "image in assistant turn": "messages[0].content[0]"}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_request_bodies(server, name):
    body, status = BAD_BODIES[name]
    for stream in (False, True):
        payload = dict(body, stream=True) if stream and isinstance(body, dict) and "stream" not in body else body
        err = _check_error(httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=60), status)
        assert err["code"] == CODES.get(name, err["code"]), err
        assert err["param"] == PARAMS.get(name, err["param"]), err
        assert err["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_bad_request_framing(server):
    url = f"{server.url}/v1/chat/completions"
    assert _check_error(httpx.post(url, content=b"{not json"), 400)["code"] == "invalid_json"
    assert _check_error(httpx.post(url, content=b"\xff\xfe{}"), 400)["code"] == "invalid_json"
    assert _check_error(httpx.post(url, content=b""), 400)["code"] == "invalid_json"
    big = json.dumps(_body(padding="x" * (MAX_BODY + 1))).encode()
    assert _check_error(httpx.post(url, content=big, timeout=60), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds on what arrives
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    assert _check_error(httpx.post(url, content=chunked(), timeout=60), 413)["code"] == "request_too_large"
    _check_error(httpx.get(f"{server.url}/v1/nothing-here"), 404)
    _check_error(httpx.get(url), 405)
    _check_error(httpx.get(f"{server.url}/v1/models/gpt-4o"), 404)


def test_openai_client_gets_the_errors(client, urls):
    with pytest.raises(openai.NotFoundError, match="mmspec-bundled"):
        client.chat.completions.create(model="gpt-4o", messages=[user_message(urls[0], "hi")])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=MODEL, messages=[user_message(urls[0], "hi")], n=2)
    with pytest.raises(openai.BadRequestError, match="at most 8"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [IMG] * 9 + [TXT]}],
                                       stream=True)


def test_still_answers_after_bad_input(client, urls, refs):
    assert ask(client, urls, 0)[0] == refs[0].text


# ----- remote images, API key, disconnects --------------------------------------------------------------
@pytest.fixture
def image_host(tmp_path):
    """A loopback HTTP server with one sample image and one image too large for the server's limit."""
    (tmp_path / "ok.png").write_bytes(IMAGES[0].read_bytes())
    (tmp_path / "big.png").write_bytes(os.urandom(MAX_IMAGE + 1024))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_images_when_allowed(pipe, refs, image_host):
    app = build_app(pipe, allow_remote_images=True, max_image_bytes=MAX_IMAGE, remote_timeout_s=5)
    with RunningServer(app) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=[user_message(f"{image_host}/ok.png", prompt_for(0))],
                                      max_tokens=MAX_TOKENS)
        assert r.choices[0].message.content == refs[0].text
        url = f"{s.url}/v1/chat/completions"
        for path, status in (("big.png", 413), ("missing.png", 400)):
            body = _body(messages=_msgs({"type": "image_url", "image_url": {"url": f"{image_host}/{path}"}}, TXT))
            _check_error(httpx.post(url, json=body, timeout=60), status)


def test_api_key_enforced(pipe, refs, urls):
    with RunningServer(build_app(pipe, api_key="s3cret")) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics")):
                r = httpx.request(method, s.url + path, headers=headers, json=_body())
                assert _check_error(r, 401)["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
            # liveness and readiness answer without the key, and then say nothing about the model
            assert httpx.get(f"{s.url}/health", headers=headers).json() == {"status": "ok"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0)
        r = good.chat.completions.create(model=MODEL, messages=[user_message(urls[0], prompt_for(0))],
                                         max_tokens=MAX_TOKENS)
        assert r.choices[0].message.content == refs[0].text
        for scheme in ("Bearer", "bearer", "BEARER"):   # the scheme name is case-insensitive (RFC 9110)
            headers = {"Authorization": f"{scheme} s3cret"}
            assert httpx.get(f"{s.url}/v1/models", headers=headers).status_code == 200
            assert httpx.get(f"{s.url}/metrics", headers=headers).status_code == 200
            assert httpx.get(f"{s.url}/health", headers=headers).json()["model"] == MODEL
    with RunningServer(build_app(pipe, api_key="s3cret", metrics_public=True)) as s:
        assert httpx.get(f"{s.url}/metrics").status_code == 200
        _check_error(httpx.get(f"{s.url}/v1/models"), 401)


def test_api_key_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv("MMSPEC_API_KEY", raising=False)
    assert resolve_api_key(None) is None and resolve_api_key("k") == "k"
    monkeypatch.setenv("MMSPEC_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("flag") == "flag"
    monkeypatch.setenv("MMSPEC_API_KEY", " ")
    assert resolve_api_key(None) is None


def test_client_that_goes_away_frees_its_row(server, pipe, urls):
    state = server.server.config.app.state.mmspec
    if pipe._scheduler is None:   # the shared engine starts with the first request
        assert httpx.post(f"{server.url}/v1/chat/completions", json=_body(max_tokens=2), timeout=60).status_code == 200
    engine = pipe._scheduler.engine
    step = engine.step

    def slow_step():  # rounds slow enough that the answer cannot finish before the client leaves
        time.sleep(0.3)
        return step()

    engine.step = slow_step
    url = f"{server.url}/v1/chat/completions"

    def wait_until_freed(before: int) -> None:
        deadline = time.monotonic() + 20
        while (state.disconnects == before or engine.active) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.disconnects == before + 1
        assert not engine.active and not state.in_flight

    try:
        before = state.disconnects
        with httpx.Client(timeout=60) as c, c.stream("POST", url, json=_body(max_tokens=64, stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break   # the first words arrived; now hang up
        wait_until_freed(before)
        before = state.disconnects
        with pytest.raises(httpx.ReadTimeout):   # not streamed: the client gives up waiting
            httpx.post(url, json=_body(max_tokens=64), timeout=httpx.Timeout(60, read=0.5))
        wait_until_freed(before)
    finally:
        del engine.step


# ----- command line and load test -----------------------------------------------------------------------
def test_serve_refuses_a_busy_port():
    from mmspec.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2


def test_load_test_runs_tiny(pipe, capsys):
    rows = load_test(pipe, concurrency=(1, 2), drafting=(True, False), requests_per_level=2, max_tokens=4,
                     images=IMAGES[:2])
    assert [(r["drafting"], r["clients"]) for r in rows] == [("eagle", 1), ("eagle", 2), ("none", 1), ("none", 2)]
    assert all(r["requests"] == 2 and r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    table = capsys.readouterr().out
    assert "| replicas | drafting | clients |" in table and table.count("\n| in-process | eagle |") == 2
    assert all(r["p50_s"] <= r["p95_s"] <= r["p99_s"] and r["peak_mib"] and r["peak_mib"][0] > 0 for r in rows)
    with pytest.raises(MMSpecError):
        load_test(pipe, requests_per_level=0)


# ----- metrics, backpressure, timeouts, log hygiene, SIGTERM ------------------------------------------------
def scrape(url: str, headers: dict | None = None) -> dict:
    """``/metrics`` parsed with prometheus-client's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there is none)."""
    return sum(v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items())


def spec_figures(stats_list) -> dict:
    """What the responses' mmspec fields say the counters must have moved by."""
    per_pos: dict[str, int] = {}
    for st in stats_list:
        for i, n in enumerate(st["accepted_per_position"]):
            per_pos[str(i)] = per_pos.get(str(i), 0) + n
    return {"mmspec:spec_decode_num_drafts_total": sum(st["drafts"] for st in stats_list),
            "mmspec:spec_decode_num_draft_tokens_total": sum(st["drafted_tokens"] for st in stats_list),
            "mmspec:spec_decode_num_accepted_tokens_total": sum(st["accepted_tokens"] for st in stats_list),
            "per_pos": per_pos}


def check_metrics_moved(before: dict, after: dict, stats_list, usages, outcomes: dict) -> None:
    want = spec_figures(stats_list)
    for name in ("mmspec:spec_decode_num_drafts_total", "mmspec:spec_decode_num_draft_tokens_total",
                 "mmspec:spec_decode_num_accepted_tokens_total"):
        assert metric(after, name) - metric(before, name) == want[name], name
    positions = {dict(lab)["position"] for (n, lab) in after.items()
                 if n == "mmspec:spec_decode_num_accepted_tokens_per_pos_total"}
    for pos in positions | set(want["per_pos"]):
        moved = metric(after, "mmspec:spec_decode_num_accepted_tokens_per_pos_total", position=pos) - \
            metric(before, "mmspec:spec_decode_num_accepted_tokens_per_pos_total", position=pos)
        assert moved == want["per_pos"].get(pos, 0), pos
    assert sum(want["per_pos"].values()) == want["mmspec:spec_decode_num_accepted_tokens_total"]
    for outcome, n in outcomes.items():
        assert metric(after, "mmspec:requests_total", outcome=outcome) - \
            metric(before, "mmspec:requests_total", outcome=outcome) == n, outcome
    answered = sum(outcomes.get(o, 0) for o in ("stop", "length"))
    moved = {name: metric(after, name) - metric(before, name) for name in (
        "mmspec:generation_tokens_total", "mmspec:prompt_tokens_total", "mmspec:e2e_request_latency_seconds_count",
        "mmspec:time_to_first_token_seconds_count")}
    assert moved == {"mmspec:generation_tokens_total": sum(u["completion_tokens"] for u in usages),
                     "mmspec:prompt_tokens_total": sum(u["prompt_tokens"] for u in usages),
                     "mmspec:e2e_request_latency_seconds_count": answered,
                     "mmspec:time_to_first_token_seconds_count": answered}


def test_metrics_move_by_what_the_responses_report(server, client, urls):
    before = scrape(server.url)
    for name in ("mmspec:spec_decode_num_drafts_total", "mmspec:num_requests_running",
                 "mmspec:num_requests_waiting", "mmspec:batch_size", "mmspec:time_per_output_token_seconds_bucket"):
        assert any(n == name for n, _ in before), name
    stats_list, usages, outcomes = [], [], {}
    for i in range(4):
        text, finish, usage, stats = ask(client, urls, i, stream=i % 2 == 1)
        stats_list.append(stats)
        usages.append(usage.model_dump())
        outcomes[finish] = outcomes.get(finish, 0) + 1
        assert sum(stats["accepted_per_position"]) == stats["accepted_tokens"] <= stats["drafted_tokens"]
    assert sum(st["drafts"] for st in stats_list) >= 1
    _check_error(httpx.post(f"{server.url}/v1/chat/completions", json=_body(n=2)), 400)
    outcomes["invalid"] = 1
    after = scrape(server.url)
    check_metrics_moved(before, after, stats_list, usages, outcomes)
    assert metric(after, "mmspec:num_requests_running") == metric(after, "mmspec:num_requests_waiting") == 0
    assert metric(after, "mmspec:replica_peak_memory_bytes", replica="local", memory="host") > 100 * 2**20


@pytest.fixture
def small_slow(pipe):
    """The target with no drafter, two rows per batch, and rounds slowed to 0.2 s: requests that overlap."""
    side = pipe.with_drafter_kind("none")
    side.default_batch_size = 2
    side.generate(IMAGES[0], prompt_for(0), max_new_tokens=1)
    side.submit(IMAGES[0], prompt_for(0), max_new_tokens=1)   # starts the shared engine, so it can be slowed
    engine = side._scheduler.engine
    step = engine.step

    def slow_step():
        time.sleep(0.2)
        return step()

    engine.step = slow_step
    yield side
    side.close()


def test_queue_bound_gives_503_with_retry_after(small_slow, urls):
    with RunningServer(build_app(small_slow, max_waiting=1)) as s:
        n = 6    # 2 rows + 1 waiting are admitted, 3 are refused
        barrier = threading.Barrier(n)

        def one(i):
            barrier.wait()
            return httpx.post(f"{s.url}/v1/chat/completions", json=_body(max_tokens=6), timeout=60)

        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(one, range(n)))
        refused = [r for r in responses if r.status_code == 503]
        assert sorted(r.status_code for r in responses) == [200] * 3 + [503] * 3
        for r in refused:
            assert _check_error(r, 503)["code"] == "queue_full" and r.headers["retry-after"] == "1"
        samples = scrape(s.url)
        assert metric(samples, "mmspec:requests_total", outcome="rejected") == 3
        assert httpx.post(f"{s.url}/v1/chat/completions", json=_body(max_tokens=2), timeout=60).status_code == 200


def test_request_timeout_frees_the_row(small_slow, urls):
    engine = small_slow._scheduler.engine
    with RunningServer(build_app(small_slow, request_timeout_s=0.6)) as s:
        url = f"{s.url}/v1/chat/completions"
        err = _check_error(httpx.post(url, json=_body(max_tokens=64), timeout=60), 504)
        assert err["code"] == "request_timeout" and err["type"] == "server_error"
        with httpx.stream("POST", url, json=_body(max_tokens=64, stream=True), timeout=60) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
        deadline = time.monotonic() + 10
        while (engine.active or s.server.config.app.state.mmspec.in_flight) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.active and not s.server.config.app.state.mmspec.in_flight
        assert metric(scrape(s.url), "mmspec:requests_total", outcome="timeout") == 2


def test_half_sent_body_is_one_log_line(pipe):
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    with RunningServer(build_app(pipe), log_level="info") as s:
        logger = logging.getLogger("uvicorn.error")
        logger.addHandler(handler)
        try:
            with socket.create_connection((s.host, s.port)) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n" + b'{"model": "' + b"x" * 5000)
                time.sleep(0.3)
            deadline = time.monotonic() + 5
            while not records and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)   # anything logged after it would show up here
        finally:
            logger.removeHandler(handler)
        assert httpx.get(f"{s.url}/health").status_code == 200
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "went away while sending the body" in records[0].getMessage() and records[0].exc_info is None


def test_too_long_prompt_gets_mmspec_error_alone(pipe, caplog):
    from mmspec.server.backend import LONG_PROMPT_WARNING

    side = pipe.with_drafter_kind("none")       # the same processor objects: their warning flags are reset here
    tokenizers = [t for t in (side.processor, getattr(side.processor, "tokenizer", None), side.adapter.tokenizer)
                  if isinstance(getattr(t, "deprecation_warnings", None), dict)]
    assert tokenizers
    long_text = "red square " * 400

    def tokenizer_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "Token indices sequence length" in r.getMessage()]

    for t in tokenizers:
        t.deprecation_warnings.pop(LONG_PROMPT_WARNING, None)
    with pytest.raises(MMSpecError):            # without the server, transformers warns first (the control)
        side.generate(IMAGES[0], long_text, max_new_tokens=2)
    assert tokenizer_warnings()
    for t in tokenizers:
        t.deprecation_warnings.pop(LONG_PROMPT_WARNING, None)
    caplog.clear()
    with RunningServer(build_app(side)) as s:
        body = _body(messages=_msgs(IMG, {"type": "text", "text": long_text}))
        err = _check_error(httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60), 400)
        assert err["code"] == "context_length_exceeded"
    assert not tokenizer_warnings()


def _wait_healthy(url: str, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not come up")


def sigterm_while_streaming(url: str, proc, urls, refs, n: int = 6, started_before: int = 2) -> list[str]:
    """Start ``n`` streamed requests, send SIGTERM once ``started_before`` of them are streaming (the others
    wait for a row), and return the answers: every one must be whole."""
    import signal

    streaming = threading.Semaphore(0)
    posted = threading.Barrier(n + 1)

    def one(i):
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": True,
                "messages": [user_message(urls[i], prompt_for(i))]}
        parts, first = [], True
        with httpx.Client(timeout=120) as c:
            posted.wait()
            with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if first:
                        first = False
                        streaming.release()
                    if line.startswith("data: {"):
                        data = json.loads(line[6:])
                        assert "error" not in data, data
                        parts += [c["delta"].get("content") or "" for c in data["choices"]]
        return "".join(parts)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        posted.wait(timeout=60)
        for _ in range(started_before):
            assert streaming.acquire(timeout=120)
        proc.send_signal(signal.SIGTERM)
        answers = [f.result(timeout=120) for f in futures]
    assert answers == [refs[i].text for i in range(n)]
    return answers


def test_sigterm_drains_the_single_process(refs, urls, tmp_path):
    import subprocess
    import sys

    from mmspec.server.loadtest import free_port

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mmspec.server", "--port", str(port), "--batch-size", "2",
                             "--log-level", "warning"], cwd=ROOT, stderr=log, text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        sigterm_while_streaming(f"http://127.0.0.1:{port}", proc, urls, refs)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
