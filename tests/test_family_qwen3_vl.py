"""Qwen3-VL, dense (``qwen3_vl``) and MoE (``qwen3_vl_moe``, a lighter run), as mmspec targets: tiny random configs built offline
(``mmspec.tiny.qwen3_vl``: interleaved M-RoPE, DeepStack from two vision layers into the first two decoder layers,
scaled so that losing it changes the output). Every drafter kind's greedy output equals
``generate(do_sample=False)`` at batch 1 and batched with rows of other image sizes (joining prefills carry the
DeepStack features of several rows), trees too; always-right and never-right drafters; the vision cache keeps the
DeepStack features with the image's (``tests.families.checks``); sampling follows the target (chi-square, as
tests/test_sampling.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mmspec.targets.qwen3_vl import Qwen3VLAdapter
from mmspec.tiny.qwen3_vl import build
from tests.families.checks import *  # noqa: F401,F403  (the shared family tests)
from tests.families.checks import MAX_NEW, check_moe_variant, family_pipes, images
from tests.tiny import sample_image
from tests.tiny_families import PROMPTS, hf_greedy


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return family_pipes(build, tmp_path_factory.mktemp("qwen3_vl"), own=dict(seed=5, vocab_pad=3))


def test_qwen3_vl_moe_matches_generate(tmp_path):
    """``qwen3_vl_moe`` (Qwen3-VL-30B-A3B's shape: routed experts, DeepStack) through the same adapter."""
    check_moe_variant(build(tmp_path / "moe", moe=True), Qwen3VLAdapter, "qwen3_vl_moe")


def test_adapter_and_deepstack_cached_with_the_image(pipes):
    pipe = pipes["none"]
    adapter = pipe.adapter
    assert isinstance(adapter, Qwen3VLAdapter)
    assert pipe.target.config.model_type == "qwen3_vl"
    image = sample_image(9, 48)
    pipe.generate(image, PROMPTS[0], max_new_tokens=2)
    feats = pipe.vision_cache.get(adapter.image_key(image))
    levels = len(pipe.target.config.vision_config.deepstack_visual_indexes)
    assert feats.shape == (36, (1 + levels) * adapter.hidden_size)     # 36 tokens for 48x48, then DeepStack
    assert pipe.generate(image, PROMPTS[1], max_new_tokens=2).stats.vision_cache_hit


def test_losing_deepstack_would_differ(pipes, monkeypatch):
    """The tests above would notice lost DeepStack features: without them some output differs from generate()."""
    pipe = pipes["none"]
    expected = [hf_greedy(pipe, im, PROMPTS[0], MAX_NEW) for im in images()]
    monkeypatch.setattr(Qwen3VLAdapter, "prompt_extras", lambda self, request: None)
    got = [pipe.generate(im, PROMPTS[0], max_new_tokens=MAX_NEW).token_ids for im in images()]
    assert got != expected


def test_sampling_follows_the_target(pipes):
    from tests.test_sampling import P_MIN, _chi2_p, _first_two_token_distributions

    pipe = pipes["text"]      # rejection sampling against a drafter's distribution; the cheapest drafter model
    image, prompt, temperature, top_p = sample_image(3, 40), PROMPTS[1], 1.0, 0.95
    p1, p2 = _first_two_token_distributions(pipe, image, prompt, temperature, top_p)
    firsts, seconds = [], []
    for seed in range(300):
        ids = pipe.generate(image, prompt, max_new_tokens=2, temperature=temperature, top_p=top_p,
                            num_draft_tokens=3, seed=seed).token_ids
        firsts.append(ids[0])
        seconds.extend(ids[1:])
    assert _chi2_p(np.bincount(firsts, minlength=len(p1)), p1) > P_MIN
    assert _chi2_p(np.bincount(seconds, minlength=len(p2)), p2) > P_MIN
