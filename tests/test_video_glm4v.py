"""Video parts for GLM-4.1V (``glm4v``): a clip is ``<|begin_of_video|>``, then per temporal patch
``<|begin_of_image|>`` + ``<|image|>`` x n + ``<|end_of_image|>`` + its timestamp, then ``<|end_of_video|>``.

Greedy output equals the target's own ``generate()`` on ``processor.apply_chat_template(messages,
add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")`` token for token, for a clip
alone, a clip in a 2-turn conversation (a text follow-up; a second clip), two clips in one turn; with the target
drafting for itself (vlm) and ngram; batched with single-image and text rows, chains and trees. Prompt positions
are those ``generate()`` hands the decoder. A repeated clip hits the vision cache.

A clip together with an image in one request is refused: transformers' own ``generate()`` fails on it (its
placeholder mask counts the clip's ``<|image|>`` tokens as the image's), so there is no reference to equal; the
test below checks that it still fails there (when transformers fixes it, wire it and drop the refusal).

The tiny processor's video processor does not sample frames (``do_sample_frames=False``: a frames list has no
fps, and GLM-4V's fps sampling refuses it), as the frames are given. Tiny random models, float32, offline.
"""

from __future__ import annotations

import pytest
import torch

import mmspec
from mmspec.errors import MMSpecError
from mmspec.targets.glm4v import Glm4vAdapter
from mmspec.tiny import glm4v
from tests.test_video import (ROWS, check_clip_cache, check_clip_with_image_refused, check_mixed_batch, clip,
                               hf_chat, hf_image, said, user)

MAX_NEW = 8


def glm_shapes() -> dict:
    a, b = clip(1), clip(2, n=2, size=24)
    return {"video": [user(a, "describe the image .")],
            "two turns": [user(a, "what color is the circle ?"), said("red circle"), user("describe the image .")],
            "two turns two clips": [user(b, "what color is the circle ?"), said("red circle"),
                                    user(a, "describe the image .")],
            "two clips": [user(a, b, "what color is the circle ?")]}


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    target = glm4v.build(tmp_path_factory.mktemp("glm4v_video") / "target")
    pipes = {kind: mmspec.load(str(target), drafter=None if kind == "ngram" else str(target), drafter_kind=kind)
             for kind in ("ngram", "vlm")}
    base = pipes["ngram"]
    refs = {name: hf_chat(base, conv) for name, conv in glm_shapes().items()}
    # the shapes give answers that tell them apart, long enough to draft over
    assert len({tuple(r) for r in refs.values()}) == len(refs) and all(len(r) > 2 for r in refs.values())
    refs.update({i: hf_image(base, image, prompt) for i, (image, prompt) in enumerate(ROWS)})
    return pipes, refs


@pytest.mark.parametrize("kind", ["ngram", "vlm"])
def test_every_shape_equals_generate(glm, kind):
    pipes, refs = glm
    pipe = pipes[kind]
    assert isinstance(pipe.adapter, Glm4vAdapter) and pipe.adapter.takes_video
    for name, conv in glm_shapes().items():
        res = pipe.chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3)
        assert res.token_ids == refs[name], (kind, name, res.rounds)
        ids = pipe.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"]
        assert res.prompt_ids == ids[0].tolist()


def test_clip_prompt_is_glm_frames(glm):
    """The clip's placeholders: one ``<|begin_of_image|>`` block per temporal patch inside the video markers, the
    image token taking the clip's features (no ``<|video|>`` left in the prompt)."""
    pipes, _ = glm
    pipe = pipes["ngram"]
    job = pipe._job(glm_shapes()["video"], None, dict(max_new_tokens=1))
    tok = pipe.adapter.tokenizer
    ids = job.request.prompt_ids
    conv = {t: tok.convert_tokens_to_ids(t) for t in ("<|begin_of_video|>", "<|end_of_video|>", "<|begin_of_image|>",
                                                      "<|image|>", "<|video|>")}
    assert ids.count(conv["<|begin_of_video|>"]) == ids.count(conv["<|end_of_video|>"]) == 1
    assert ids.count(conv["<|begin_of_image|>"]) == 2 and conv["<|video|>"] not in ids   # 4 frames: 2 patches
    assert job.request.order == ("video",) and job.request.token_types[0].tolist().count(2) == ids.count(
        conv["<|image|>"])


def test_positions_equal_generate(glm):
    """The 3-D prompt positions the engine hands over are those ``generate()`` hands the decoder in its prefill."""
    pipes, _ = glm
    pipe = pipes["ngram"]
    seen = []

    def grab(module, args, kwargs):
        if not seen:
            seen.append(kwargs["position_ids"].detach().clone())

    for conv in glm_shapes().values():
        seen.clear()
        handle = pipe.target.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            hf_chat(pipe, conv, max_new=1)
        finally:
            handle.remove()
        request = pipe._job(conv, None, dict(max_new_tokens=1)).request
        n = len(request.prompt_ids)
        ours = pipe.adapter.positions(request)(torch.arange(n + 3))
        theirs = seen[0][:, 0]
        assert theirs.shape[-1] == n and torch.equal(ours[1:, :n].cpu(), theirs[-3:].cpu())
        if theirs.shape[0] == 4:
            assert torch.equal(ours[0, :n].cpu(), theirs[0].cpu())
        # after the prompt: p + rope_delta on all three axes, as generate() continues them
        delta = int(theirs[-3:, -1].max()) + 1 - n
        assert torch.equal(ours[1:, n:].cpu(), (torch.arange(n, n + 3) + delta).expand(3, -1))


@pytest.mark.parametrize("kind,tree", [("ngram", None), ("vlm", None), ("vlm", 6)])
def test_batch_mixes_videos_with_image_rows(glm, kind, tree):
    """Video conversations, single-image rows and a text-only row in one batch, chains and trees: each row equals
    its own generate()."""
    pipes, refs = glm
    pipe = pipes[kind]
    check_mixed_batch(pipe, refs, glm_shapes(), tree, keys=("video", "two clips", "two turns two clips"))


@pytest.mark.parametrize("kind", ["ngram", "vlm"])
def test_repeated_clip_hits_the_vision_cache(glm, kind):
    check_clip_cache(glm[0][kind])


def test_clip_with_image_is_refused_as_generate_fails(glm):
    check_clip_with_image_refused(glm[0]["ngram"])


def test_frames_without_fps_follow_the_processor(glm):
    """GLM-4.1V's own video processor samples by fps (``do_sample_frames``): a frames list has none, so its
    processor refuses it, and so does the engine, naming the processor's reason."""
    pipes, _ = glm
    pipe = pipes["ngram"]
    vp = pipe.processor.video_processor
    vp.do_sample_frames = True
    try:
        conv = glm_shapes()["video"]
        with pytest.raises(ValueError, match="video metadata"):
            hf_chat(pipe, conv, max_new=1)
        with pytest.raises(MMSpecError, match="video metadata"):
            pipe.chat(conv, max_new_tokens=2)
    finally:
        vp.do_sample_frames = False


def test_video_file_sampled_by_fps(glm, tmp_path, monkeypatch):
    """A video file goes, as a path, to the processor, which samples it by fps and writes each temporal patch's
    timestamp (a stand-in decoder for torchcodec, as in tests/test_video.py): the answer is generate()'s."""
    import io

    import numpy as np
    import transformers.video_processing_utils as vpu
    from PIL import Image, ImageSequence
    from transformers.video_utils import VideoMetadata

    import vision.images
    from tests.test_video import _apng

    def decode(path, backend=None, sample_indices_fn=None, **kw):
        with Image.open(io.BytesIO(open(path, "rb").read()[4:])) as im:
            video = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
        meta = VideoMetadata(total_num_frames=len(video), fps=1.0, duration=len(video) / 1.0, video_backend=backend)
        indices = sample_indices_fn(metadata=meta) if sample_indices_fn else np.arange(len(video))
        meta.update({"frames_indices": indices, "height": video.shape[1], "width": video.shape[2]})
        return video[indices], meta

    monkeypatch.setattr(vision.images, "video_decoder_available", lambda: True)
    monkeypatch.setattr(vpu, "is_torchcodec_usable", lambda decode=None: True)
    monkeypatch.setattr(vpu, "load_video", decode)
    pipes, _ = glm
    pipe = pipes["ngram"]
    vp = pipe.processor.video_processor
    monkeypatch.setattr(vp, "do_sample_frames", True)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"MP4:" + _apng(clip(6, n=6)))
    conv = [user({"type": "video", "video": str(path)}, "describe the image .")]
    request = pipe._job(conv, None, dict(max_new_tokens=1)).request
    assert request.videos == [str(path)]
    tokens = pipe.adapter.tokenizer.convert_ids_to_tokens(request.prompt_ids)
    stamps = [tokens[i + 1] for i, t in enumerate(tokens) if t == "<|end_of_image|>"]
    assert request.model_inputs["video_grid_thw"].tolist() == [[3, 8, 8]] and stamps == ["0", "2", "4"]   # 1 fps
    expected = hf_chat(pipe, conv)
    first = pipe.chat(conv, max_new_tokens=MAX_NEW)
    assert first.token_ids == expected and not first.stats.vision_cache_hit
    assert pipes["vlm"].chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3).token_ids == expected


def test_glm4v_moe_clip_equals_generate(tmp_path):
    """GLM-4.5V's ``glm4v_moe`` takes clips through the same adapter."""
    target = glm4v.build(tmp_path / "moe", moe=True, seed=13)
    pipe = mmspec.load(str(target), drafter=str(target), drafter_kind="vlm")
    assert pipe.target.config.model_type == "glm4v_moe" and pipe.adapter.takes_video
    for name in ("video", "two turns two clips"):
        conv = glm_shapes()[name]
        assert pipe.chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3).token_ids == hf_chat(pipe, conv), name
