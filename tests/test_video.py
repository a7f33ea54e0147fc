"""Video parts in conversations (issue 28): ``{"type": "video", "video": [frames...]}`` on the families that take
video -- Qwen2-VL, Qwen2.5-VL (with its own processor: ``second_per_grid_ts``), Qwen3-VL (DeepStack features for
clips too), LLaVA-OneVision.

Greedy output equals the target's own ``generate()`` on ``processor.apply_chat_template(messages,
add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")`` token for token, for a clip
alone, a clip with an image, a clip in a 2-turn conversation; with the drafter kinds that see the clip (vlm: the
target drafting for itself, eagle: a random head) and those that do not (text, ngram, none); batched with
single-image and text rows; with trees. The image cache works per clip. An animated PNG is its frames. A family
without video refuses a video part naming it, before any vision work; bad videos are refused naming the part.
The server takes ``video_url`` (an animated image) and ``video`` (frame URLs) parts with the real ``openai``
client. Tiny random models, float32, offline.
"""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLProcessor

import mmspec
from mmspec.errors import MMSpecError
from mmspec.targets.qwen3_vl import Qwen3VLAdapter
from mmspec.tiny import qwen3_vl
from tests.tiny import build_tiny_llava, sample_image
from tests.tiny_families import (build_tiny_llava_next, build_tiny_qwen_text_drafter, build_tiny_qwen_vl,
                                 random_eagle_head)

MAX_NEW = 8
# the tiny LLaVA-OneVision template with a video part (the shared one renders images only)
OV_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
               "<image> {% elif c['type'] == 'video' %}<video> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
               "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}")


def clip(seed: int, n: int = 4, size: int = 32) -> list:
    return [sample_image(seed * 10 + i, size) for i in range(n)]


def user(*parts) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                        p if isinstance(p, dict) else
                                        {"type": "video", "video": p} if isinstance(p, list) else
                                        {"type": "image", "image": p} for p in parts]}


def said(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def shapes() -> dict:
    a, b, image = clip(1), clip(2, n=2, size=24), sample_image(5, 24)
    return {"video": [user(a, "describe the image .")],
            "video and image": [user(image, "what color is the circle ?", b, "describe the image .")],
            "two turns": [user(a, "what color is the circle ?"), said("red circle"),
                          user(image, "describe the image .")]}


def hf_chat(pipe, messages, max_new: int = MAX_NEW) -> list[int]:
    inputs = pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                return_tensors="pt")
    out = pipe.target.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_image(pipe, image, prompt: str) -> list[int]:
    return hf_chat(pipe, [user(image, prompt)] if image is not None else [user(prompt)])


# the single-image and text-only rows batched with the video conversations
ROWS = [(sample_image(3, 40), "describe the image ."), (None, "what color is the circle ?"),
        (sample_image(4, 24), "what color is the circle ?")]


# ----- the families -------------------------------------------------------------------------------------------
def _load(target, kinds: dict) -> dict:
    return {kind: mmspec.load(str(target), drafter=None if d is None else str(d), drafter_kind=kind) for kind, d in
            kinds.items()}


def _qwen2(root):
    target = build_tiny_qwen_vl(root / "target", version="2")
    return _load(target, {"none": None, "ngram": None, "vlm": target,
                          "eagle": random_eagle_head(target, root / "eagle"),
                          "text": build_tiny_qwen_text_drafter(root / "text")})


def _qwen25(root):
    target = build_tiny_qwen_vl(root / "target", version="2.5")
    src = AutoProcessor.from_pretrained(target)   # Qwen2.5-VL's own processor gives second_per_grid_ts
    Qwen2_5_VLProcessor(image_processor=src.image_processor, tokenizer=src.tokenizer,
                        video_processor=src.video_processor, chat_template=src.chat_template).save_pretrained(target)
    return _load(target, {"ngram": None, "vlm": target})


def _qwen3(root):
    target = qwen3_vl.build(root / "target")
    return _load(target, {"ngram": None, "vlm": target, "eagle": random_eagle_head(target, root / "eagle")})


def _onevision(root):
    target = build_tiny_llava_next(root / "target", onevision=True)
    proc = AutoProcessor.from_pretrained(target)
    proc.chat_template = OV_TEMPLATE
    proc.save_pretrained(target)
    return _load(target, {"ngram": None, "vlm": target, "eagle": random_eagle_head(target, root / "eagle")})


BUILDERS = {"qwen2_vl": _qwen2, "qwen2_5_vl": _qwen25, "qwen3_vl": _qwen3, "llava_onevision": _onevision}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            pipes = BUILDERS[name](tmp_path_factory.mktemp(name))
            base = next(iter(pipes.values()))
            refs = {shape: hf_chat(base, conv) for shape, conv in shapes().items()}
            # the shapes give answers that tell them apart, long enough to draft over
            assert len({tuple(r) for r in refs.values()}) == len(refs) and all(len(r) > 2 for r in refs.values())
            refs.update({i: hf_image(base, image, prompt) for i, (image, prompt) in enumerate(ROWS)})
            cache[name] = pipes, refs
        return cache[name]
    return get


CASES = [(f, k) for f, kinds in {"qwen2_vl": ["none", "ngram", "text", "vlm", "eagle"], "qwen2_5_vl": ["ngram", "vlm"],
                                 "qwen3_vl": ["ngram", "vlm", "eagle"],
                                 "llava_onevision": ["ngram", "vlm", "eagle"]}.items() for k in kinds]


@pytest.mark.parametrize("family,kind", CASES)
def test_every_shape_equals_generate(families, family, kind):
    pipes, refs = families(family)
    pipe = pipes[kind]
    assert pipe.adapter.takes_video
    for name, conv in shapes().items():
        res = pipe.chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3)
        assert res.token_ids == refs[name], (family, kind, name, res.rounds)
        ids = pipe.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"]
        assert res.prompt_ids == ids[0].tolist()


BATCHES = [("qwen2_vl", "ngram", None), ("qwen2_vl", "eagle", None), ("qwen2_vl", "text", 6), ("qwen2_vl", "vlm", 6),
           ("qwen2_vl", "eagle", 6), ("qwen3_vl", "vlm", 6), ("qwen3_vl", "eagle", None),
           ("llava_onevision", "eagle", 6), ("llava_onevision", "vlm", None)]


def check_batch(pipe, rows, expected, tree) -> None:
    """``rows`` ((conversation, None) or (image, prompt)) in one batch of 3 (rows join as others leave), chains or
    trees of ``tree`` nodes with no probability floor (bushy: branches everywhere): each row equals its
    ``expected`` generate() output, and a tree run drafted branches."""
    floor = pipe.strategy.tree_floor
    pipe.strategy.tree_floor = 0.0 if tree else floor
    try:
        results = pipe.generate_batch([r[0] for r in rows], [r[1] for r in rows], batch_size=3,
                                      max_new_tokens=MAX_NEW, tree_nodes=tree, num_draft_tokens=3)
    finally:
        pipe.strategy.tree_floor = floor
    for i, (res, exp) in enumerate(zip(results, expected)):
        assert res.error is None and res.token_ids == exp, (i, res.error, res.rounds)
    if tree:
        assert any(r.parents and len(set(r.parents)) < len(r.parents) for res in results for r in res.rounds)


def check_clip_cache(pipe) -> None:
    """A repeated clip hits the vision cache (not re-encoded), two clips are cached apart, reversed frames miss; the
    answers equal generate()."""
    pipe.vision_cache.clear()
    a = clip(7)
    first = pipe.chat([user(a, "describe the image .")], max_new_tokens=2)
    assert not first.stats.vision_cache_hit and len(pipe.vision_cache) == 1   # the vlm drafter shares the entry
    misses = pipe.vision_cache.misses
    conv = [user(a, "what color is the circle ?")]
    again = pipe.chat(conv, max_new_tokens=MAX_NEW)
    assert again.stats.vision_cache_hit and pipe.vision_cache.misses == misses    # not re-encoded
    assert again.token_ids == hf_chat(pipe, conv)
    b = clip(8, n=2, size=24)
    pipe.chat([user(b, "hi")], max_new_tokens=1)
    both = [user(b, a, "describe the image .")]
    res = pipe.chat(both, max_new_tokens=MAX_NEW)
    assert res.stats.vision_cache_hit and res.token_ids == hf_chat(pipe, both)   # clips cached apart
    assert not pipe.chat([user(a[::-1], "describe the image .")], max_new_tokens=1).stats.vision_cache_hit


def check_clip_with_image_refused(pipe) -> None:
    """Families whose transformers ``generate()`` fails on a clip and an image in one request (GLM-4.1V, SmolVLM):
    generate() still fails (so the day transformers fixes it, this says so), and mmspec refuses the request up
    front, before any vision work, alone or as a batch row."""
    image = sample_image(5, 24)
    for conv in ([user(image, "what color is the circle ?", clip(2, n=2, size=24), "describe the image .")],
                 [user(clip(1), "what color is the circle ?"), said("red circle"), user(image, "describe it .")]):
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            hf_chat(pipe, conv, max_new=1)   # transformers' own generate() cannot run it
        misses = pipe.vision_cache.misses
        with pytest.raises(MMSpecError, match="not both") as info:
            pipe.chat(conv, max_new_tokens=2)
        assert info.value.code == "unsupported_value" and pipe.vision_cache.misses == misses
        res = pipe.generate_batch([conv], batch_size=1, max_new_tokens=2)[0]
        assert "not both" in res.error and not res.token_ids


def check_mixed_batch(pipe, refs, convs, tree=None, keys=("video", "video and image", "two turns")) -> None:
    """The conversations ``convs[keys]`` interleaved with ``ROWS`` (two single-image rows and a text-only one) in
    one batch, through ``check_batch``; ``refs`` holds each one's generate() output (by key, and 0..2 for ROWS)."""
    rows, expected = [], []
    for i, key in enumerate(keys):
        rows += [(convs[key], None), ROWS[i]]
        expected += [refs[key], refs[i]]
    check_batch(pipe, rows, expected, tree)


@pytest.mark.parametrize("family,kind,tree", BATCHES)
def test_batch_mixes_videos_with_image_rows(families, family, kind, tree):
    """Video conversations, single-image rows and a text-only row in one batch (rows join as others leave), chains
    and trees: each row equals its own generate()."""
    pipes, refs = families(family)
    pipe = pipes[kind]
    check_mixed_batch(pipe, refs, shapes(), tree)


def test_stream_and_submit_take_video(families):
    from mmspec.scheduler import iter_job_events

    pipes, refs = families("qwen2_vl")
    conv = shapes()["video and image"]
    events = list(pipes["eagle"].stream(conv, max_new_tokens=MAX_NEW))
    assert events[-1].done and events[-1].result.token_ids == refs["video and image"]
    job = pipes["text"].submit(conv, max_new_tokens=MAX_NEW)
    assert list(iter_job_events(job))[-1].result.token_ids == refs["video and image"]


@pytest.mark.parametrize("kind", ["ngram", "vlm"])
def test_image_cache_works_per_clip(families, kind):
    pipes, _ = families("qwen2_vl")
    pipe = pipes[kind]
    pipe.vision_cache.clear()
    a, image = clip(7), sample_image(8, 24)
    first = pipe.chat([user(a, "describe the image .")], max_new_tokens=2)
    assert not first.stats.vision_cache_hit and len(pipe.vision_cache) == 1   # the vlm drafter shares the entry
    misses = pipe.vision_cache.misses
    again = pipe.chat([user(a, "what color is the circle ?")], max_new_tokens=MAX_NEW)
    assert again.stats.vision_cache_hit and pipe.vision_cache.misses == misses    # not re-encoded
    assert again.token_ids == hf_chat(pipe, [user(a, "what color is the circle ?")])
    pipe.generate(image, "describe the image .", max_new_tokens=1)                 # the image on its own
    both = pipe.chat([user(image, a, "describe the image .")], max_new_tokens=MAX_NEW)
    assert both.stats.vision_cache_hit                                             # image and clip cached apart
    assert both.token_ids == hf_chat(pipe, [user(image, a, "describe the image .")])
    assert not pipe.chat([user(a[::-1], "describe the image .")], max_new_tokens=1).stats.vision_cache_hit
    assert not pipe.chat([user(a[0], "describe the image .")], max_new_tokens=1).stats.vision_cache_hit  # a frame


def test_qwen2_5_positions_take_seconds_per_grid(families):
    """Qwen2.5-VL's processor gives ``second_per_grid_ts``; the adapter's prompt positions are get_rope_index's with
    it (as generate() computes them), which differ from those without it."""
    pipes, _ = families("qwen2_5_vl")
    pipe = pipes["ngram"]
    conv = [user(sample_image(5, 24), clip(1), "describe the image .")]   # 4 frames: 2 temporal patches
    inputs = pipe.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                return_tensors="pt")
    assert inputs["second_per_grid_ts"] is not None
    grids = dict(mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                 video_grid_thw=inputs["video_grid_thw"])
    expected, delta = pipe.target.model.get_rope_index(inputs["input_ids"], **grids,
                                                       second_per_grid_ts=inputs["second_per_grid_ts"])
    without, _ = pipe.target.model.get_rope_index(inputs["input_ids"], **grids)
    assert not torch.equal(expected, without)
    req = pipe._job(conv, None, dict(max_new_tokens=1)).request
    got, got_delta = pipe.adapter.rope_positions(req)
    assert torch.equal(got, expected) and got_delta == int(delta.view(-1)[0])


def test_qwen3_vl_clips_carry_deepstack(families, monkeypatch):
    """The DeepStack features of a clip are cached with it and reach the decoder: without them outputs differ."""
    pipes, refs = families("qwen3_vl")
    pipe = pipes["ngram"]
    pipe.vision_cache.clear()
    conv = shapes()["video"]
    pipe.chat(conv, max_new_tokens=1)
    feats = pipe.vision_cache.get(pipe.adapter.video_key(conv[0]["content"][0]["video"]))
    levels = len(pipe.target.config.vision_config.deepstack_visual_indexes)
    assert feats.shape[-1] == (1 + levels) * pipe.adapter.hidden_size
    monkeypatch.setattr(Qwen3VLAdapter, "prompt_extras", lambda self, request: None)
    got = [pipe.chat(c, max_new_tokens=MAX_NEW).token_ids for c in shapes().values()]
    assert got != list(refs.values())


def _apng(frames) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def test_animated_image_is_its_frames(families, tmp_path):
    """An animated PNG (lossless) as a path, bytes or data: URL is read with Pillow into its frames: the answer is
    generate()'s for those frames."""
    pipes, refs = families("qwen2_vl")
    pipe = pipes["ngram"]
    raw = _apng(clip(1))
    path = tmp_path / "clip.png"
    path.write_bytes(raw)
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    for source in ({"video": str(path)}, {"path": str(path)}, {"video": raw}, {"url": url}, {"url": f"file://{path}"}):
        conv = [user(dict(type="video", **source), "describe the image .")]
        assert pipe.chat(conv, max_new_tokens=MAX_NEW).token_ids == refs["video"], source


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_video_file_goes_to_the_processor(families, family, tmp_path, monkeypatch):
    """A video file Pillow cannot read is handed, as a path, to the target's processor, as apply_chat_template hands
    it; the processor reads it with torchcodec, which is not installed here, so a stand-in decoder reads it (frames
    and fps, then the processor's own frame sampling: Qwen3-VL samples by fps and writes timestamps)."""
    import numpy as np
    import transformers.video_processing_utils as vpu
    from PIL import Image, ImageSequence
    from transformers.video_utils import VideoMetadata

    import vision.images

    def decode(path, backend=None, sample_indices_fn=None, **kw):
        with Image.open(io.BytesIO(open(path, "rb").read()[4:])) as im:
            video = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
        meta = VideoMetadata(total_num_frames=len(video), fps=4.0, duration=len(video) / 4.0, video_backend=backend)
        indices = sample_indices_fn(metadata=meta) if sample_indices_fn else np.arange(len(video))
        meta.update({"frames_indices": indices, "height": video.shape[1], "width": video.shape[2]})
        return video[indices], meta

    monkeypatch.setattr(vision.images, "video_decoder_available", lambda: True)
    monkeypatch.setattr(vpu, "is_torchcodec_usable", lambda decode=None: True)
    monkeypatch.setattr(vpu, "load_video", decode)
    pipes, _ = families(family)
    pipe = pipes["ngram"]
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"MP4:" + _apng(clip(6, n=6)))     # not an image to Pillow
    conv = [user(sample_image(5, 24), {"type": "video", "video": str(path)}, "describe the image .")]
    assert pipe._job(conv, None, dict(max_new_tokens=1)).request.videos == [str(path)]   # the path, not frames
    expected = hf_chat(pipe, conv)
    first = pipe.chat(conv, max_new_tokens=MAX_NEW)
    assert first.token_ids == expected and not first.stats.vision_cache_hit
    again = pipe.chat(conv, max_new_tokens=MAX_NEW)
    assert again.token_ids == expected and again.stats.vision_cache_hit   # keyed by the file's bytes
    assert pipes["vlm"].chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3).token_ids == expected


# ----- refusals -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    return mmspec.load(drafter_kind="none")


def test_family_without_video_refuses_a_video_part(bundled):
    misses = bundled.vision_cache.misses
    conv = [user(sample_image(1, 32), clip(1), "describe the image .")]
    with pytest.raises(MMSpecError, match="takes no video") as info:
        bundled.chat(conv, max_new_tokens=2)
    assert info.value.param == "messages[0].content[1]" and info.value.code == "unsupported_value"
    assert bundled.vision_cache.misses == misses and not bundled.adapter.takes_video
    res = bundled.generate_batch([conv], batch_size=1, max_new_tokens=2)[0]
    assert "messages[0].content[1]" in res.error and not res.token_ids


def bad_videos(tmp_path) -> dict:
    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    frames = clip(1, n=2)
    return {
        "no frames": ([user({"type": "video", "video": []}, "hi")], "messages[0].content[0]", "no frames"),
        "undecodable frame": ([user("hi", {"type": "video", "video": [frames[0], b"not an image"]})],
                              "messages[0].content[1]", "frame 1"),
        "mp4 without a decoder": ([user({"type": "video", "video": str(mp4)}, "hi")], "messages[0].content[0]",
                                  "torchcodec"),
        "mp4 bytes": ([user({"type": "video", "video": mp4.read_bytes()}, "hi")], "messages[0].content[0]",
                      "frames"),
        "missing file": ([user({"type": "video", "path": str(tmp_path / "none.mp4")}, "hi")],
                         "messages[0].content[0]", "not found"),
        "no source": ([user({"type": "video"}, "hi")], "messages[0].content[0]", "needs one of"),
        "video in assistant turn": ([{"role": "assistant", "content": [{"type": "video", "video": frames}]},
                                     user("hi")], "messages[0].content[0]", "user turns"),
        "remote video": ([user({"type": "video", "url": "https://example.com/x.mp4"}, "hi")],
                         "messages[0].content[0]", "http"),
    }


def test_bad_videos_are_refused_naming_the_part(families, tmp_path):
    pipes, _ = families("qwen2_vl")
    pipe = pipes["ngram"]
    for name, (conv, param, words) in bad_videos(tmp_path).items():
        misses = pipe.vision_cache.misses
        with pytest.raises(MMSpecError, match=words) as info:
            pipe.chat(conv, max_new_tokens=2)
        assert info.value.param == param, name
        assert pipe.vision_cache.misses == misses, name


def test_frames_count_against_max_images(families):
    pipes, _ = families("qwen2_vl")
    pipe = pipes["ngram"]
    pipe.max_images = 5
    try:
        with pytest.raises(MMSpecError, match="video frames") as info:
            pipe.chat([user(sample_image(1, 24), clip(1, n=6), "hi")])
        assert info.value.code == "too_many_images"
        with pytest.raises(MMSpecError) as info:   # an animated image's frames are counted once read
            pipe.chat([user({"type": "video", "video": _apng(clip(1, n=6))}, "hi")])
        assert info.value.code == "too_many_images"
        assert pipe.chat([user(clip(1), "describe the image .")], max_new_tokens=1).token_ids
    finally:
        pipe.max_images = None


# ----- the server ---------------------------------------------------------------------------------------------
def _png_url(image) -> str:
    from mmspec.server import data_url

    return data_url(image)


def test_server_takes_video_parts(families):
    from mmspec.server import RunningServer, build_app

    pipes, refs = families("qwen2_vl")
    pipe = pipes["ngram"]
    a, image = clip(1), sample_image(5, 24)
    apng = "data:image/png;base64," + base64.b64encode(_apng(a)).decode()
    with RunningServer(build_app(pipe, max_images=6)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for part in ({"type": "video_url", "video_url": {"url": apng}},
                     {"type": "video", "video": [_png_url(f) for f in a]}):
            answer = client.chat.completions.create(model=model, max_tokens=MAX_NEW, messages=[
                {"role": "user", "content": [part, {"type": "text", "text": "describe the image ."}]}])
            assert answer.choices[0].message.content == pipe.adapter.decode(refs["video"])
        # a video with an image, across two turns
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": apng}},
                                                 {"type": "text", "text": "what color is the circle ?"}]},
                    {"role": "assistant", "content": "red circle"},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_url(image)}},
                                                 {"type": "text", "text": "describe the image ."}]}]
        answer = client.chat.completions.create(model=model, max_tokens=MAX_NEW, messages=messages)
        conv = [user(a, "what color is the circle ?"), {"role": "assistant", "content": [
            {"type": "text", "text": "red circle"}]}, user(image, "describe the image .")]
        assert answer.choices[0].message.content == pipe.chat(conv, max_new_tokens=MAX_NEW).text
        bad = {"too many frames": ({"type": "video", "video": [_png_url(f) for f in clip(2, n=7)]}, "too_many_images",
                                   "messages"),
               "mp4": ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(
                   b"\x00\x00\x00\x18ftypmp42" + bytes(64)).decode()}}, "invalid_video", "messages[0].content[0]"),
               "frames not a list": ({"type": "video", "video": "x"}, "invalid_type", "messages[0].content[0].video")}
        for name, (part, code, param) in bad.items():
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
                "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": [part, {
                    "type": "text", "text": "hi"}]}]})
            assert r.status_code == 400, (name, r.text)
            err = r.json()["error"]
            assert (err["code"], err["param"]) == (code, param), (name, err)


def test_server_without_video_gives_400(tmp_path):
    from mmspec.server import RunningServer, build_app

    pipe = mmspec.load(str(build_tiny_llava(tmp_path / "llava")), drafter=None, drafter_kind="none")
    with RunningServer(build_app(pipe)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "video", "video": [
                    _png_url(f) for f in clip(1, n=2)]}]}])
        err = info.value.body
        assert err["code"] == "unsupported_value" and err["param"] == "messages[0].content[1]", err
        assert "takes no video" in err["message"]
