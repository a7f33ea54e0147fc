"""Video parts in conversations on InternVL (``internvl``, transformers' own format): the processor writes a clip
as one ``<img>...</img>`` tile per frame and merges the frames into ``pixel_values`` with the images' tiles, and the
model runs them through ``get_image_features`` (it has no video path of its own). Greedy output equals the target's
own ``generate()`` on ``processor.apply_chat_template(...)`` token for token for a clip alone, a clip with an
image, a clip in a 2-turn conversation; with the target drafting for itself (vlm) and ngram; batched with
single-image and text rows, chains and trees. The image cache works per clip and per image. Tiny random model
(``mmspec.tiny.internvl``), float32, offline."""

from __future__ import annotations

import pytest

import mmspec
from mmspec.errors import MMSpecError
from mmspec.targets.internvl import InternVLAdapter
from mmspec.tiny import internvl
from tests.test_video import MAX_NEW, ROWS, check_mixed_batch, clip, hf_chat, hf_image, said, shapes, user
from tests.tiny import sample_image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    target = internvl.build(tmp_path_factory.mktemp("internvl") / "target", seed=5, vocab_pad=3)
    pipes = {kind: mmspec.load(str(target), drafter=str(target) if kind == "vlm" else None, drafter_kind=kind)
             for kind in ("ngram", "vlm")}
    base = pipes["ngram"]
    refs = {shape: hf_chat(base, conv) for shape, conv in shapes().items()}
    assert len({tuple(r) for r in refs.values()}) == len(refs) and all(len(r) > 2 for r in refs.values())
    refs.update({i: hf_image(base, image, prompt) for i, (image, prompt) in enumerate(ROWS)})
    return pipes, refs


def test_adapter_takes_video(setup):
    pipes, _ = setup
    adapter = pipes["ngram"].adapter
    assert isinstance(adapter, InternVLAdapter) and adapter.takes_video
    # a clip of 4 frames: 4 runs of one tile each; a 24 px image before it: 2x2 tiles + thumbnail
    conv = [user(sample_image(5, 24), clip(1), "describe the image .")]
    req = pipes["ngram"]._job(conv, None, dict(max_new_tokens=1)).request
    assert req.order == ("image", "video") and adapter.item_tiles(req) == [5, 4]


@pytest.mark.parametrize("kind", ["ngram", "vlm"])
def test_every_shape_equals_generate(setup, kind):
    pipes, refs = setup
    pipe = pipes[kind]
    for name, conv in shapes().items():
        res = pipe.chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3)
        assert res.token_ids == refs[name], (kind, name, res.rounds)
        ids = pipe.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"]
        assert res.prompt_ids == ids[0].tolist()


def test_two_clips_and_an_image(setup):
    """Two clips (same frame count, as the processor stacks them) around an image: each block in its place."""
    pipes, _ = setup
    conv = [user(clip(3, n=3), sample_image(6, 32), "what color is the circle ?", clip(4, n=3, size=24)),
            said("red circle"), user("describe the image .")]
    a, b, image = clip(3, n=3), clip(4, n=3, size=24), sample_image(6, 32)
    swapped = [user(b, image, "what color is the circle ?", a)] + conv[1:]
    expected, other = hf_chat(pipes["ngram"], conv), hf_chat(pipes["ngram"], swapped)
    assert expected != other   # the clips' blocks are told apart
    for pipe in pipes.values():
        pipe.vision_cache.clear()
        assert pipe.chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3).token_ids == expected
        assert pipe.chat(swapped, max_new_tokens=MAX_NEW, num_draft_tokens=3).token_ids == other


def test_clips_of_different_lengths_are_refused(setup):
    """The processor stacks a request's clips, so they need one frame count (transformers refuses others too)."""
    pipe = setup[0]["ngram"]
    misses = pipe.vision_cache.misses
    with pytest.raises(MMSpecError, match="processor refuses"):
        pipe.chat([user(clip(3, n=2), "hi", clip(4, n=3))], max_new_tokens=2)
    assert pipe.vision_cache.misses == misses


@pytest.mark.parametrize("kind,tree", [("ngram", None), ("vlm", None), ("vlm", 6)])
def test_batch_mixes_videos_with_image_rows(setup, kind, tree):
    pipes, refs = setup
    pipe = pipes[kind]
    check_mixed_batch(pipe, refs, shapes(), tree)


@pytest.mark.parametrize("kind", ["ngram", "vlm"])
def test_image_cache_works_per_clip(setup, kind):
    pipe = setup[0][kind]
    pipe.vision_cache.clear()
    a, image = clip(7), sample_image(8, 24)
    first = pipe.chat([user(a, "describe the image .")], max_new_tokens=2)
    assert not first.stats.vision_cache_hit and len(pipe.vision_cache) == 1
    misses = pipe.vision_cache.misses
    again = pipe.chat([user(a, "what color is the circle ?")], max_new_tokens=MAX_NEW)
    assert again.stats.vision_cache_hit and pipe.vision_cache.misses == misses
    assert again.token_ids == hf_chat(pipe, [user(a, "what color is the circle ?")])
    pipe.generate(image, "describe the image .", max_new_tokens=1)
    both = pipe.chat([user(image, a, "describe the image .")], max_new_tokens=MAX_NEW)
    assert both.stats.vision_cache_hit
    assert both.token_ids == hf_chat(pipe, [user(image, a, "describe the image .")])
    assert not pipe.chat([user(a[::-1], "describe the image .")], max_new_tokens=1).stats.vision_cache_hit
