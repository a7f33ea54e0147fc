"""The web demo without a browser: the generation handler's HTML matches the rounds, its text matches
``pipe.generate``, bad input becomes a message, and the CLI binds to 127.0.0.1 with no share link by default."""

from __future__ import annotations

import html
import re

import gradio as gr
import pytest

import mmspec
from demos import app as demo_app
from mmspec import cli
from tests.tiny import sample_image

PROMPT = "describe the image ."
SPAN = re.compile(r'<span class="tok tok-(accepted|rejected|target)" data-id="(\d+)" data-round="(\d+)"[^>]*>'
                  r'(.*?)</span>', re.S)


@pytest.fixture(scope="module")
def pipe(tiny_target, tiny_drafter):
    return mmspec.load(str(tiny_target), drafter=str(tiny_drafter))


@pytest.fixture(scope="module")
def app(pipe):
    return demo_app.build_app(pipe, examples=[])


def run_handler(app, *args, **kwargs):
    outs = list(app.mmspec_backend.generate(*args, **kwargs))
    assert outs, "the handler yielded nothing"
    return outs


def expected_spans(rounds):
    out = []
    for i, r in enumerate(rounds, 1):
        out += [("accepted", t, i) for t in r.draft_ids[:r.n_accepted]]
        out += [("rejected", t, i) for t in r.draft_ids[r.n_accepted:]]
        if r.target_token is not None:
            out.append(("target", r.target_token, i))
    return out


def test_build_app_is_blocks_with_the_drafter_kinds(app, pipe):
    assert isinstance(app, gr.Blocks)
    from mmspec.drafters import weightless_kinds

    assert app.mmspec_backend.kinds == ["text", *weightless_kinds()] and {"ngram", "none"} <= set(weightless_kinds())
    # extra kinds share the loaded target (weights and vision cache)
    assert app.mmspec_backend.pipeline("ngram").adapter is pipe.adapter
    assert app.mmspec_backend.pipeline("none").drafter_kind == "none"


def test_build_app_accepts_a_factory(pipe):
    built = demo_app.build_app(lambda: pipe, examples=[])
    assert built.mmspec_backend.pipe is pipe


@pytest.mark.parametrize("kind, seed", [("ngram", 0), ("text", 0), ("none", 1)])
def test_html_spans_match_rounds_and_text_matches_generate(app, pipe, kind, seed):
    img = sample_image(seed)
    # a fixed draft length: the adaptive one follows measured forward times, so two runs may draft differently
    k = 0 if kind == "none" else 3
    ref = app.mmspec_backend.pipeline(kind).generate(img, PROMPT, max_new_tokens=40, num_draft_tokens=k)
    plain = pipe.generate(img, PROMPT, max_new_tokens=40)
    assert ref.token_ids == plain.token_ids  # lossless, whatever the drafter
    outs = run_handler(app, img, PROMPT, kind, k, 0.0, 40, False, 0)
    tokens_html, table, stats, final, error = outs[-1]
    assert error == ""
    assert final == plain.text
    spans = [(k, int(t), int(r)) for k, t, r, _ in SPAN.findall(tokens_html)]
    assert spans == expected_spans(ref.rounds)
    # one table row per round with "accepted/drafted"
    assert len(table) == len(ref.rounds)
    assert [row[2] for row in table] == [f"{r.n_accepted}/{len(r.draft_ids)}" for r in ref.rounds]
    # the accepted and VLM tokens, in order, are exactly the output
    emitted = [t for k, t, _ in spans if k != "rejected"]
    assert emitted == plain.token_ids
    # streamed: one yield per round, or fewer when the page falls behind the engine (the last carries the done stats)
    assert 1 <= len(outs) <= len(ref.rounds)
    assert "done" in stats and "tokens/s" in stats and "acceptance rate" in stats and "vision cache hit" in stats
    # legend present, classes styled
    for cls in ("tok-accepted", "tok-rejected", "tok-target"):
        assert cls in tokens_html


def test_ngram_run_shows_accepted_and_rejected_tokens(app):
    # sample image 0 with this prompt and 3 drafts a round: the ngram drafter gets some drafts accepted and many
    # rejected (a fixed length: the adaptive one learns from measured costs that drafting does not pay here)
    tokens_html = run_handler(app, sample_image(0), PROMPT, "ngram", 3, 0.0, 64, False, 0)[-1][0]
    kinds = [k for k, *_ in SPAN.findall(tokens_html)]
    assert "accepted" in kinds and "rejected" in kinds and "target" in kinds


def test_visible_text_of_emitted_spans_concatenates_to_the_text(app, pipe):
    img = sample_image(3)
    res = pipe.generate(img, PROMPT, max_new_tokens=30)
    tokens_html = run_handler(app, img, PROMPT, "ngram", 2, 0.0, 30, False, 0)[-1][0]
    specials = set(pipe.processor.tokenizer.all_special_ids)
    vocab = len(pipe.processor.tokenizer)
    shown = "".join(html.unescape(txt) for k, t, _, txt in SPAN.findall(tokens_html)
                    if k != "rejected" and int(t) not in specials and int(t) < vocab)
    assert shown == res.text


def test_compare_reports_speedup_and_identical_output(app, pipe):
    img = sample_image(2)
    outs = run_handler(app, img, PROMPT, "ngram", 0, 0.0, 16, True, 0)
    _, _, stats, final, error = outs[-1]
    assert error == "" and final == pipe.generate(img, PROMPT, max_new_tokens=16).text
    assert "speedup on this request" in stats and "×" in stats
    assert re.search(r">yes</div><div class='stat-name'[^>]*>same text as plain decoding<", stats)


def test_sampling_runs_and_is_reproducible_with_a_seed(app):
    img = sample_image(4)
    a = run_handler(app, img, PROMPT, "text", 3, 0.8, 12, False, 7)[-1]
    b = run_handler(app, img, PROMPT, "text", 3, 0.8, 12, False, 7)[-1]
    assert a[4] == "" and a[3] == b[3]


def test_concurrent_requests_share_the_model_and_stay_exact(app, pipe):
    # the page runs several requests at once (queue concurrency > 1) on one shared target
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(sample_image(i), kind) for i, kind in enumerate(["text", "ngram", "none", "ngram"])]
    with ThreadPoolExecutor(max_workers=4) as pool:
        finals = list(pool.map(lambda job: run_handler(app, job[0], PROMPT, job[1], 0, 0.0, 24, False, 0)[-1],
                               jobs))
    for (img, _), out in zip(jobs, finals):
        assert out[4] == "" and out[3] == pipe.generate(img, PROMPT, max_new_tokens=24).text


@pytest.fixture
def rows_per_round(monkeypatch):
    """Rows of every round the shared engines run (slowed a little, so that requests overlap)."""
    import time

    from mmspec.engine import Engine

    seen: list[int] = []
    step = Engine.step

    def counting(self):
        events = step(self)
        if self.max_batch > 1 and events:
            seen.append(len(events))
            time.sleep(0.01)
        return events

    monkeypatch.setattr(Engine, "step", counting)
    return seen


def test_concurrent_users_are_decoded_in_one_batch_and_each_gets_generates_text(app, pipe, rows_per_round):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    users = [(sample_image(10 + i), kind, i == 2) for i, kind in enumerate(["text"] * 5 + ["ngram"] * 2)]
    start = threading.Barrier(len(users))

    def user(req):
        img, kind, compare = req
        start.wait()
        return run_handler(app, img, PROMPT, kind, 0, 0.0, 32, compare, 0)[-1]

    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        finals = list(pool.map(user, users))
    for (img, _, compare), out in zip(users, finals):
        assert out[4] == "", out[4]
        assert out[3] == pipe.generate(img, PROMPT, max_new_tokens=32).text
        assert ("speedup on this request" in out[2]) == compare
    assert max(rows_per_round) >= 3, rows_per_round  # several users' requests shared the target's forwards


def test_the_served_page_runs_requests_together(pipe, tmp_path, rows_per_round):
    # through Gradio's queue, as browsers reach it: requests must not wait for each other
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    served = demo_app.build_app(pipe, examples=[])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo_app.launch(served, port=port, block=False, quiet=True)
    try:
        paths = []
        for i in range(3):
            paths.append(tmp_path / f"{i}.png")
            sample_image(20 + i).save(paths[-1])
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)

        def request(path):
            return client.predict(handle_file(str(path)), PROMPT, "text", 0, 0.0, 48, False, 0, api_name="/generate")

        with ThreadPoolExecutor(max_workers=len(paths)) as pool:
            outs = list(pool.map(request, paths))
    finally:
        served.close()
    for path, out in zip(paths, outs):
        assert out[3] == pipe.generate(str(path), PROMPT, max_new_tokens=48).text
    assert max(rows_per_round) >= 2, rows_per_round


def test_a_closed_page_frees_its_row(app, monkeypatch, rows_per_round):
    import time

    kind_pipe = app.mmspec_backend.pipeline("ngram")
    jobs = []
    submit = kind_pipe.submit
    monkeypatch.setattr(kind_pipe, "submit", lambda *a, **k: jobs.append(submit(*a, **k)) or jobs[-1])
    gen = app.mmspec_backend.generate(sample_image(5), PROMPT, "ngram", 1, 0.0, 220, False, 0)
    next(gen)            # the first round is on the page
    gen.close()          # the user closes the page: Gradio closes the handler's generator
    job = jobs[0]
    deadline = time.time() + 30
    while not job.done and time.time() < deadline:
        time.sleep(0.01)
    assert job.cancelled and job.done and job.result.stats.stop_reason == "cancelled"
    assert job.result.stats.new_tokens < 400


@pytest.mark.parametrize("image, prompt, kind, k, temp, n, message", [
    (b"this is not an image at all", PROMPT, "ngram", 0, 0.0, 8, "not an image"),
    ("/nonexistent/picture.png", PROMPT, "ngram", 0, 0.0, 8, "image not found"),
    (sample_image(0), "   ", "ngram", 0, 0.0, 8, "prompt is empty"),
    (sample_image(0), PROMPT, "ngram", 0, -1.0, 8, "temperature"),
    (sample_image(0), PROMPT, "ngram", 99, 0.0, 8, "num_draft_tokens"),
    (sample_image(0), PROMPT, "ngram", 0, 0.0, 0, "max_new_tokens"),
    (sample_image(0), PROMPT, "ngram", 0, 0.0, "many", "max new tokens"),
    (sample_image(0), PROMPT, "visual", 0, 0.0, 8, "unknown drafter kind"),
])
def test_bad_input_becomes_a_message_not_an_exception(app, image, prompt, kind, k, temp, n, message):
    outs = run_handler(app, image, prompt, kind, k, temp, n, False, 0)
    tokens_html, table, stats, final, error = outs[-1]
    assert message in html.unescape(error), error
    assert "Traceback" not in error and final == ""


def _component(app, elem_id):
    return next(c for c in app.blocks.values() if getattr(c, "elem_id", None) == elem_id)


def test_draft_length_means_what_the_api_means_and_max_new_tokens_stays_in_the_context(app, pipe):
    assert "0 = no drafting" in _component(app, "num-draft").label
    assert _component(app, "adaptive").value is True
    assert _component(app, "max-new-tokens").maximum == pipe.adapter.context_length
    img = sample_image(1)
    outs = run_handler(app, img, PROMPT, "ngram", 0, 0.0, 12, False, 0)
    assert outs[-1][4] == "" and "tok-accepted" not in outs[-1][0].split("</div>", 1)[1]   # 0: nothing drafted
    settings = app.mmspec_backend._settings(3, 0.0, 12, 0, 0, True)
    assert settings["num_draft_tokens"] is None           # adaptive: the API's None
    assert app.mmspec_backend._settings(0, 0.0, 12, 0)["num_draft_tokens"] == 0
    error = run_handler(app, img, PROMPT, "ngram", 0, 0.0, pipe.adapter.context_length + 1, False, 0)[-1][4]
    assert "context" in error


def _chat(app, state, image, prompt, n=12):
    outs = list(app.mmspec_backend.chat(image, prompt, "text", None, 0.0, n, False, 0, 0, True, state))
    assert outs[-1][4] == "", outs[-1][4]
    return outs[-1]


def test_chat_follow_ups_second_image_and_text_only(app, pipe):
    a, b = sample_image(1), sample_image(2)
    first = _chat(app, None, a, PROMPT)
    follow = _chat(app, first[5], a, "what color is the circle ?")   # the same image: not sent again
    added = _chat(app, follow[5], b, "and this one ?")
    messages = added[5]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert [sum(p["type"] == "image" for p in m["content"]) for m in messages[::2]] == [1, 0, 1]
    # each answer is pipe.chat's on the conversation up to its turn
    for out, upto in ((first, 1), (follow, 3), (added, 5)):
        assert out[3] == pipe.chat(messages[:upto], max_new_tokens=12).text
    assert "[image 2]" in added[6] and "and this one ?" in added[6]
    text_only = _chat(app, None, None, PROMPT)
    assert text_only[3] == pipe.generate(None, PROMPT, max_new_tokens=12).text
    # the token view is per answer: its emitted tokens are this answer's alone
    spans = [int(t) for k, t, _, _ in SPAN.findall(added[0]) if k != "rejected"]
    assert spans == pipe.chat(messages[:5], max_new_tokens=12).token_ids
    # an error keeps the conversation as it was
    bad = list(app.mmspec_backend.chat(b"not an image", PROMPT, "text", None, 0.0, 8, False, 0, 0, True, added[5]))
    assert "not an image" in bad[-1][4] and bad[-1][5] is added[5]


def test_bad_file_on_disk_becomes_a_message(app, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    error = run_handler(app, str(bad), PROMPT, "ngram", 0, 0.0, 8, False, 0)[-1][4]
    assert "corrupt or truncated" in error or "not an image" in error


def test_image_input_hands_the_raw_path_to_mmspec(tmp_path):
    # Gradio must not open the upload itself (a bad file would fail before the handler could explain it)
    from gradio.data_classes import ImageData

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    comp = demo_app.raw_image_input(render=False)
    assert comp.preprocess(ImageData(path=str(bad), orig_name="notes.png")) == str(bad)
    assert comp.preprocess(None) is None


def test_cli_defaults_bind_locally_without_share():
    parser = cli.build_parser()
    args = parser.parse_args(["demo"])
    assert args.module == "demos.app"
    assert args.host == "127.0.0.1" and args.port == 7860 and args.share is False
    assert args.max_upload_mb > 0 and args.concurrency >= 1
    assert args.target is None and args.drafter == "default"  # the bundled pair
    args = parser.parse_args(["demo", "--host", "0.0.0.0", "--port", "8081", "--share", "--concurrency", "3",
                              "--max-upload-mb", "2", "--drafter-kind", "ngram"])
    assert (args.host, args.port, args.share, args.concurrency, args.max_upload_mb, args.drafter_kind) == \
        ("0.0.0.0", 8081, True, 3, 2.0, "ngram")


def test_launch_passes_host_port_share_and_limits(app, monkeypatch):
    seen = {}
    monkeypatch.setattr(app, "launch", lambda **kw: seen.update(kw))
    monkeypatch.setattr(app, "queue", lambda **kw: seen.update(queue=kw))
    demo_app.launch(app, max_upload_mb=3, concurrency=4)
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7860 and seen["share"] is False
    assert seen["max_file_size"] == 3 * 1024 * 1024
    assert seen["queue"]["default_concurrency_limit"] == 4


def test_run_wires_the_cli_flags(monkeypatch, pipe):
    from mmspec import model_flags

    seen = {}
    monkeypatch.setattr(model_flags, "load_from_args", lambda args: pipe)
    monkeypatch.setattr(demo_app, "launch", lambda demo, **kw: seen.update(kw, demo=demo) or (None, "url", None))
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    args = cli.build_parser().parse_args(["demo", "--port", "7999", "--concurrency", "5"])
    assert demo_app.run(args) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 7999 and seen["share"] is False
    assert seen["concurrency"] == 5 and isinstance(seen["demo"], gr.Blocks)


def test_tree_rounds_show_the_path_and_the_rejected_branches_apart(app, pipe):
    """With tree nodes, the accepted path reads as accepted tokens and the rejected branches sit in their own
    bracket; the text is generate()'s."""
    img = sample_image(2)
    plain = pipe.generate(img, PROMPT, max_new_tokens=30)
    outs = run_handler(app, img, PROMPT, "text", 3, 0.0, 30, False, 0, 8)
    tokens_html, table, stats, final, error = outs[-1]
    assert error == "" and final == plain.text
    assert 'class="tok-branches"' in tokens_html
    outs = run_handler(app, img, PROMPT, "ngram", 3, 0.0, 30, False, 0, 8)
    assert "does not draft trees" in outs[-1][4]
