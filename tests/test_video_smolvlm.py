"""Video parts for SmolVLM / SmolVLM2 (``smolvlm``): ``SmolVLMProcessor`` writes a clip as a text intro, then per
frame a timestamp and one global-image block (``<fake_token_around_image><global-img>`` + ``<image>`` x
image_seq_len + ``<fake_token_around_image>``); the frames go through the model's ``get_image_features``.

Greedy output equals the target's own ``generate()`` on ``processor.apply_chat_template(messages,
add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")`` token for token, for a clip
alone, a clip in a 2-turn conversation (a text follow-up; a second clip), two clips in one turn; with the target
drafting for itself (vlm) and ngram; batched with single-image and text rows, chains and trees. Positions are 1-D.
A repeated clip hits the vision cache.

A clip together with an image in one request is refused: transformers' video processor gives the frames under the
images' names (``pixel_values``), so its processor drops the images' pixels and its own ``generate()`` fails
("Image features and image tokens do not match"); the test checks that it still fails there.

``SmolVLMProcessor`` needs the optional ``num2words`` package (the clip intro spells the frame count); without it
the tiny builder saves an ``Idefics3Processor`` (no video) and this module is skipped. Tiny random models, float32,
offline.
"""

from __future__ import annotations

import pytest

pytest.importorskip("num2words")

import mmspec  # noqa: E402
from mmspec.errors import MMSpecError  # noqa: E402
from mmspec.targets.idefics3 import Idefics3Adapter  # noqa: E402
from tests.test_video import (ROWS, check_clip_cache, check_clip_with_image_refused, check_mixed_batch, clip,
                               hf_chat, hf_image, said, user)  # noqa: E402
from tests.tiny_families import build_tiny_idefics3  # noqa: E402

MAX_NEW = 8


def smol_shapes() -> dict:
    a, b = clip(1), clip(2, n=2, size=24)
    return {"video": [user(a, "describe the image .")],
            "two turns": [user(a, "what color is the circle ?"), said("red circle"), user("describe the image .")],
            "two turns two clips": [user(b, "what color is the circle ?"), said("red circle"),
                                    user(a, "describe the image .")],
            "two clips": [user(a, b, "what color is the circle ?")]}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    target = build_tiny_idefics3(tmp_path_factory.mktemp("smolvlm_video") / "target", smolvlm=True)
    pipes = {kind: mmspec.load(str(target), drafter=None if kind == "ngram" else str(target), drafter_kind=kind)
             for kind in ("ngram", "vlm")}
    base = pipes["ngram"]
    refs = {name: hf_chat(base, conv) for name, conv in smol_shapes().items()}
    # the shapes give answers that tell them apart, long enough to draft over
    assert len({tuple(r) for r in refs.values()}) == len(refs) and all(len(r) > 2 for r in refs.values())
    refs.update({i: hf_image(base, image, prompt) for i, (image, prompt) in enumerate(ROWS)})
    return pipes, refs


@pytest.mark.parametrize("kind", ["ngram", "vlm"])
def test_every_shape_equals_generate(smol, kind):
    pipes, refs = smol
    pipe = pipes[kind]
    assert isinstance(pipe.adapter, Idefics3Adapter) and pipe.adapter.takes_video
    assert pipe.target.config.model_type == "smolvlm"
    for name, conv in smol_shapes().items():
        res = pipe.chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3)
        assert res.token_ids == refs[name], (kind, name, res.rounds)
        ids = pipe.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"]
        assert res.prompt_ids == ids[0].tolist()


def test_clip_prompt_is_one_block_per_frame(smol):
    pipes, _ = smol
    pipe = pipes["ngram"]
    job = pipe._job(smol_shapes()["video"], None, dict(max_new_tokens=1))
    tok = pipe.adapter.tokenizer
    ids = job.request.prompt_ids
    glob, image = tok.convert_tokens_to_ids("<global-img>"), tok.convert_tokens_to_ids("<image>")
    assert ids.count(glob) == 4 and ids.count(image) == 4 * pipe.processor.image_seq_len   # 4 frames
    assert job.request.order == ("video",) and not job.request.images
    assert tuple(job.request.model_inputs["pixel_values"].shape[:2]) == (1, 4)


@pytest.mark.parametrize("kind,tree", [("ngram", None), ("vlm", None), ("vlm", 6)])
def test_batch_mixes_videos_with_image_rows(smol, kind, tree):
    """Video conversations, single-image rows and a text-only row in one batch, chains and trees: each row equals
    its own generate()."""
    pipes, refs = smol
    pipe = pipes[kind]
    check_mixed_batch(pipe, refs, smol_shapes(), tree, keys=("video", "two clips", "two turns two clips"))


@pytest.mark.parametrize("kind", ["ngram", "vlm"])
def test_repeated_clip_hits_the_vision_cache(smol, kind):
    check_clip_cache(smol[0][kind])


def test_clip_with_image_is_refused_as_generate_fails(smol):
    check_clip_with_image_refused(smol[0]["ngram"])


def test_idefics3_still_refuses_video(tmp_path):
    """Idefics3 has no video processor: a clip is refused naming the part."""
    target = build_tiny_idefics3(tmp_path / "idefics3")
    pipe = mmspec.load(str(target))
    assert not pipe.adapter.takes_video
    with pytest.raises(MMSpecError, match="takes no video"):
        pipe.chat([user(clip(1), "describe the image .")], max_new_tokens=2)
