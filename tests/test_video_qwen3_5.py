"""Video parts in conversations on Qwen3.5 (``qwen3_5``: natively multimodal, Qwen3-VL-style vision without
DeepStack, a hybrid Gated DeltaNet / gated full-attention decoder).

transformers runs video for the family offline: the processor (``Qwen3VLProcessor`` with ``Qwen3VLVideoProcessor``)
writes each temporal patch of a clip as its own ``<t seconds>`` + vision block, ``get_video_features`` is the image
path's, and ``get_rope_index`` splits ``video_grid_thw`` per temporal patch. Greedy output equals the target's own
``generate()`` on ``processor.apply_chat_template(...)`` token for token for a clip alone, a clip with an image and a
clip in a 2-turn conversation, with the target drafting for itself (vlm) and ngram; batched with single-image and
text rows (chains: the family verifies no trees, and a tree is refused with video rows too); the prompt positions
are get_rope_index's with ``video_grid_thw``; a repeated clip is served from the vision cache. Tiny random model
(``mmspec.tiny.qwen3_5``), float32, offline; helpers from ``tests.test_video``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mmspec
from mmspec.errors import MMSpecError
from mmspec.targets.qwen3_5 import Qwen3_5Adapter
from mmspec.tiny import qwen3_5
from tests.test_video import MAX_NEW, ROWS, check_mixed_batch, clip, hf_chat, hf_image, shapes, user
from tests.tiny import sample_image

KINDS = ["ngram", "vlm"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    # the whole head rotated, seed 1: the three conversation shapes give different answers, and each changes when
    # the clips' positions do (test_positions_are_get_rope_index_with_the_clips)
    target = qwen3_5.build(tmp_path_factory.mktemp("qwen3_5_video") / "target", seed=1, vocab_pad=9,
                           rotary_factor=1.0)
    pipes = {kind: mmspec.load(str(target), drafter=str(target) if kind == "vlm" else None, drafter_kind=kind)
             for kind in KINDS}
    base = pipes["ngram"]
    refs = {shape: hf_chat(base, conv) for shape, conv in shapes().items()}
    assert len({tuple(r) for r in refs.values()}) == len(refs) and all(len(r) > 2 for r in refs.values())
    refs.update({i: hf_image(base, image, prompt) for i, (image, prompt) in enumerate(ROWS)})
    return pipes, refs


def test_family_takes_video(family):
    pipes, _ = family
    adapter = pipes["ngram"].adapter
    assert isinstance(adapter, Qwen3_5Adapter) and adapter.takes_video
    cfg = pipes["ngram"].target.config
    assert adapter.feature_token_ids == {cfg.image_token_id, cfg.video_token_id}


@pytest.mark.parametrize("kind", KINDS)
def test_every_shape_equals_generate(family, kind):
    pipes, refs = family
    pipe = pipes[kind]
    for name, conv in shapes().items():
        res = pipe.chat(conv, max_new_tokens=MAX_NEW, num_draft_tokens=3)
        assert res.token_ids == refs[name], (kind, name, res.rounds)
        if kind == "vlm":   # the target drafting for itself, clip included: its drafts are kept
            assert sum(r.n_accepted for r in res.rounds) >= MAX_NEW // 2, (name, res.rounds)
        ids = pipe.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"]
        assert res.prompt_ids == ids[0].tolist()


def test_positions_are_get_rope_index_with_the_clips(family, monkeypatch):
    """The adapter's prompt positions are the model's get_rope_index with ``video_grid_thw`` (each temporal patch
    its own block, as generate() computes them), which differ from those of the clips' tokens taken as text; with
    those, every shape's answer would differ (so the shapes' tests notice wrong positions)."""
    pipes, refs = family
    pipe = pipes["ngram"]
    conv = [user(sample_image(5, 24), clip(1), "describe the image .")]   # 4 frames: 2 temporal patches
    inputs = pipe.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                return_tensors="pt")
    assert inputs["video_grid_thw"].tolist()[0][0] == 2
    types = inputs["mm_token_type_ids"]
    expected, delta = pipe.target.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=types,
                                                       image_grid_thw=inputs["image_grid_thw"],
                                                       video_grid_thw=inputs["video_grid_thw"])
    req = pipe._job(conv, None, dict(max_new_tokens=1)).request
    assert req.token_types is not None and torch.equal(req.token_types.cpu(), types)
    got, got_delta = pipe.adapter.rope_positions(req)
    assert torch.equal(got, expected) and got_delta == int(delta.view(-1)[0])
    assert got_delta != 0                       # the clip's grid shortens the positions
    p = torch.arange(got.shape[-1] + 3)
    pos = pipe.adapter.positions(req)(p)      # row 0: plain positions; later ones continue at p + delta
    assert torch.equal(pos[0], p) and torch.equal(pos[1:, : got.shape[-1]], got[:, 0])
    assert torch.equal(pos[1:, got.shape[-1]:], (p[got.shape[-1]:] + got_delta).expand(3, -1))

    own = Qwen3_5Adapter.rope_positions

    def as_text(self, request):   # the clips' placeholders numbered as text tokens
        inputs = {k: v for k, v in request.model_inputs.items() if k != "video_grid_thw"}
        types = None if request.token_types is None else request.token_types * (request.token_types != 2)
        return own(self, dataclasses.replace(request, model_inputs=inputs, token_types=types))

    monkeypatch.setattr(Qwen3_5Adapter, "rope_positions", as_text)
    for name, conv in shapes().items():
        assert pipe.chat(conv, max_new_tokens=MAX_NEW).token_ids != refs[name], name


@pytest.mark.parametrize("kind", KINDS)
def test_batch_mixes_videos_with_image_rows(family, kind):
    """Video conversations, single-image rows and a text-only row in one batch (rows join as others leave), chains:
    each row equals its own generate(). A tree is refused (linear attention), video rows or not."""
    pipes, refs = family
    pipe = pipes[kind]
    check_mixed_batch(pipe, refs, shapes())
    if kind == "vlm":
        with pytest.raises(MMSpecError, match="linear-attention"):
            pipe.chat(shapes()["video"], max_new_tokens=MAX_NEW, tree_nodes=4)


@pytest.mark.parametrize("kind", KINDS)
def test_image_cache_works_per_clip(family, kind):
    pipes, _ = family
    pipe = pipes[kind]
    pipe.vision_cache.clear()
    a, image = clip(7), sample_image(8, 24)
    first = pipe.chat([user(a, "describe the image .")], max_new_tokens=2)
    assert not first.stats.vision_cache_hit and len(pipe.vision_cache) == 1   # the vlm drafter shares the entry
    misses = pipe.vision_cache.misses
    again = pipe.chat([user(a, "what color is the circle ?")], max_new_tokens=MAX_NEW, num_draft_tokens=3)
    assert again.stats.vision_cache_hit and pipe.vision_cache.misses == misses    # not re-encoded
    assert again.token_ids == hf_chat(pipe, [user(a, "what color is the circle ?")])
    pipe.generate(image, "describe the image .", max_new_tokens=1)                 # the image on its own
    both = pipe.chat([user(image, a, "describe the image .")], max_new_tokens=MAX_NEW, num_draft_tokens=3)
    assert both.stats.vision_cache_hit                                             # image and clip cached apart
    assert both.token_ids == hf_chat(pipe, [user(image, a, "describe the image .")])
    assert not pipe.chat([user(a[::-1], "describe the image .")], max_new_tokens=1).stats.vision_cache_hit
