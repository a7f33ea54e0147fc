"""The web demo in a real browser: Debian's headless Chromium (never a browser downloaded by Playwright) uploads
an image, types a prompt, picks the ngram drafter, clicks Generate and reads the tokens and the final text.

Set ``MMSPEC_SCREENSHOT=path.png`` to keep a screenshot of the page after the generation."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

import mmspec
from demos import app as demo_app
from tests.tiny import sample_image

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "describe the image ."
MAX_NEW = 64
K = 3  # draft tokens per round, set on the page
MAX_UPLOAD_MB = 0.25

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium: apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe(tiny_target, tiny_drafter):
    return mmspec.load(str(tiny_target), drafter=str(tiny_drafter))


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-images")
    image_path = folder / "sample0.png"
    sample_image(0).save(image_path)
    app = demo_app.build_app(pipe, examples=[[str(image_path)]], default_prompt=PROMPT,
                             default_max_new_tokens=MAX_NEW)
    port = free_port()
    demo_app.launch(app, port=port, block=False, quiet=True, concurrency=2, max_upload_mb=MAX_UPLOAD_MB)
    try:
        yield f"http://127.0.0.1:{port}", image_path
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_generate_in_the_browser_shows_accepted_and_rejected_tokens(server, browser, pipe, tmp_path):
    url, image_path = server
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_selector("#generate", timeout=60_000)

    page.locator("#image-input input[type=file]").set_input_files(str(image_path))
    page.wait_for_selector("#image-input img", timeout=30_000)
    page.locator("#prompt textarea").fill(PROMPT)
    # drafter kind: ngram (on these random tiny models it gets some drafts accepted, many rejected)
    page.locator("#drafter-kind input").click()
    page.get_by_role("option", name="ngram", exact=True).click()
    # 3 drafts a round (the adaptive length follows measured costs, so it could differ from the run compared below)
    page.locator("#adaptive input[type=checkbox]").uncheck()   # the slider's length, not the adaptive one
    page.locator("#num-draft input[type=number]").fill(str(K))
    page.locator("#num-draft input[type=number]").press("Enter")
    page.locator("#compare input[type=checkbox]").check()
    page.locator("#generate").click()

    page.wait_for_function(
        "() => { const s = document.querySelector('#stats'); return s && /done/.test(s.innerText)"
        " && /speedup/.test(s.innerText); }", timeout=120_000)
    assert page.locator("#error-box [role=alert]").count() == 0
    accepted = page.locator("#tokens span.tok.tok-accepted").count()
    rejected = page.locator("#tokens span.tok.tok-rejected").count()
    target = page.locator("#tokens span.tok.tok-target").count()
    final = page.locator("#final-text textarea").input_value()

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("MMSPEC_SCREENSHOT"):
        dest = Path(os.environ["MMSPEC_SCREENSHOT"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)

    ref = pipe.generate(image_path, PROMPT, max_new_tokens=MAX_NEW)
    assert final == ref.text
    assert accepted > 0 and rejected > 0 and target > 0
    # what the page shows matches the rounds the ngram drafter produces for this request
    rounds = demo_app.DemoBackend(pipe).pipeline("ngram").generate(image_path, PROMPT, max_new_tokens=MAX_NEW,
                                                                   num_draft_tokens=K).rounds
    assert accepted == sum(r.n_accepted for r in rounds)
    assert rejected == sum(len(r.draft_ids) - r.n_accepted for r in rounds)
    assert target == sum(r.target_token is not None for r in rounds)
    page.close()


def test_clicking_a_sample_image_fills_the_input_and_generates(server, browser, pipe):
    url, image_path = server
    page = browser.new_page()
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_selector("#generate", timeout=60_000)
    page.locator("#examples button.gallery-item").first.click()
    page.wait_for_selector("#image-input img", timeout=30_000)
    page.locator("#generate").click()  # default prompt and drafter
    page.wait_for_function("() => /done/.test(document.querySelector('#stats')?.innerText || '')", timeout=120_000)
    assert page.locator("#final-text textarea").input_value() == pipe.generate(image_path, PROMPT,
                                                                                max_new_tokens=MAX_NEW).text
    assert page.locator("#tokens span.tok").count() > 0
    page.close()


def test_bad_upload_shows_a_message_in_the_page(server, browser, tmp_path):
    url, _ = server
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image at all")
    page = browser.new_page()
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_selector("#generate", timeout=60_000)
    page.locator("#image-input input[type=file]").set_input_files(str(bad))
    page.wait_for_timeout(1000)
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#generate").click()
    alert = page.locator("#error-box [role=alert]")
    alert.wait_for(timeout=60_000)
    assert "not an image" in alert.inner_text()
    assert "Traceback" not in page.content()
    page.close()


def test_upload_over_the_size_limit_is_refused_with_a_message(server, browser, tmp_path):
    url, _ = server
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * int(MAX_UPLOAD_MB * 1024 * 1024 * 2))
    page = browser.new_page()
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_selector("#generate", timeout=60_000)
    page.locator("#image-input input[type=file]").set_input_files(str(big))
    # Gradio refuses it at upload time, with a toast naming the limit
    page.wait_for_function("() => /exceed the maximum allowed size/i.test(document.body.innerText)", timeout=30_000)
    assert page.locator("#image-input img").count() == 0
    assert "Traceback" not in page.content()
    page.close()
