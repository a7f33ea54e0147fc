"""Qwen2-VL and Qwen2.5-VL targets: M-RoPE positions, variable image-token counts, padded vocabularies.

Greedy output of every drafter kind (text, ngram, none, vlm with a shared and with its own vision tower) equals the
target's own ``generate(do_sample=False)`` with an image; session logits over several new tokens and after a
rollback equal HF's uncached forward; the vision cache hits on a second request; sampling is lossless (chi-square
of the first generated tokens against the exact target distribution, p > 1e-4 as in tests/test_sampling.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmspec
from mmspec.targets.qwen2_vl import Qwen2VLAdapter
from tests.test_sampling import P_MIN, _chi2_p, _first_two_token_distributions
from tests.tiny import sample_image
from tests.tiny_families import (build_tiny_qwen_text_drafter, build_tiny_qwen_vl, hf_greedy, hf_logits,
                                 qwen_tokenizer)

PROMPTS = ["what color is the circle ?", "describe the image ."]
MAX_NEW = 20          # > 2 (k + 1) for every k used here
IMAGES = [(0, 40), (1, 56), (2, 24)]   # (seed, size): different sizes give different image-token counts
KINDS = ["text", "ngram", "none", "vlm", "vlm-own"]


@pytest.fixture(scope="module", params=["2", "2.5"])
def family(request, tmp_path_factory):
    v = request.param
    root = tmp_path_factory.mktemp(f"qwen{v}")
    target = build_tiny_qwen_vl(root / "target", version=v, vocab_pad=7, seed=0)
    n_tok = len(qwen_tokenizer())
    text = build_tiny_qwen_text_drafter(root / "text", vocab_rows=n_tok)            # fewer rows than the target
    vlm = build_tiny_qwen_vl(root / "vlm", version=v, vocab_pad=2, seed=3, layers=1, vision_from=target)
    vlm_own = build_tiny_qwen_vl(root / "vlm-own", version=v, vocab_pad=11, seed=4, layers=1)  # more rows
    drafters = {"text": text, "ngram": None, "none": None, "vlm": vlm, "vlm-own": vlm_own}
    pipes = {kind: mmspec.load(str(target), drafter=None if d is None else str(d), drafter_kind=kind.split("-")[0])
             for kind, d in drafters.items()}
    return v, pipes


def test_adapter_and_padded_vocabularies(family):
    v, pipes = family
    pipe = pipes["none"]
    assert isinstance(pipe.adapter, Qwen2VLAdapter)
    assert pipe.target.config.model_type == {"2": "qwen2_vl", "2.5": "qwen2_5_vl"}[v]
    n_tok = len(pipe.processor.tokenizer)
    assert pipe.adapter.vocab_size > n_tok
    assert pipes["text"].drafter.get_output_embeddings().weight.shape[0] < pipe.adapter.vocab_size
    assert pipes["vlm"].drafter.get_output_embeddings().weight.shape[0] < pipe.adapter.vocab_size
    assert pipes["vlm-own"].drafter.get_output_embeddings().weight.shape[0] > pipe.adapter.vocab_size
    assert pipes["vlm"].strategy.shared_vision and not pipes["vlm-own"].strategy.shared_vision


def test_image_token_count_varies_with_size(family):
    _, pipes = family
    adapter = pipes["none"].adapter
    counts = set()
    for seed, size in IMAGES:
        req = adapter.prepare(sample_image(seed, size), adapter.format_prompt(PROMPTS[0]))
        counts.add(sum(t in adapter.image_token_ids for t in req.prompt_ids))
    assert len(counts) == len(IMAGES)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [None, 1, 3])
def test_every_kind_matches_hf_greedy(family, kind, k):
    _, pipes = family
    pipe = pipes[kind]
    for i, (seed, size) in enumerate(IMAGES[:2]):
        image, prompt = sample_image(seed, size), PROMPTS[i % 2]
        expected = hf_greedy(pipe, image, prompt, MAX_NEW)
        res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=k)
        assert res.token_ids == expected
        assert sum(len(r.emitted) for r in res.rounds) == len(res.token_ids)


def test_session_logits_equal_hf_forward_after_rollback(family):
    _, pipes = family
    pipe = pipes["none"]
    image, prompt = sample_image(1, 56), PROMPTS[1]
    adapter = pipe.adapter
    # any continuation works; image placeholders would be read as image slots by an uncached forward
    new = [t for t in hf_greedy(pipe, image, prompt, 12) if t not in adapter.image_token_ids][:6]
    ref = hf_logits(pipe, image, prompt, new)               # [7, vocab]
    req = adapter.prepare(image, adapter.format_prompt(prompt))
    adapter.image_features(req)
    with torch.inference_mode():
        sess = adapter.session(req)
        base = sess.length
        got = sess.forward(torch.tensor([req.prompt_ids[-1]] + new))      # several new positions at once
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
        sess.rollback(base + 3)                                            # reject the tail, verify again
        again = sess.forward(torch.tensor(new[2:]))
        assert torch.allclose(again, ref[3:], atol=1e-4, rtol=1e-4)
        wrong = sess.forward(torch.tensor([5]))                              # a different continuation
        assert sess.length == base + 1 + len(new) + 1 and wrong.shape[0] == 1


@pytest.mark.parametrize("kind", ["none", "vlm", "vlm-own"])
def test_vision_cache_hit_on_second_request(family, kind):
    _, pipes = family
    pipe = pipes[kind]
    image = sample_image(7, 48)
    before = len(pipe.vision_cache)
    first = pipe.generate(image, PROMPTS[0], max_new_tokens=4)
    second = pipe.generate(image, PROMPTS[1], max_new_tokens=4)
    assert not first.stats.vision_cache_hit and second.stats.vision_cache_hit
    # a drafter with the target's vision side reuses its features; one with its own caches them under its key
    assert len(pipe.vision_cache) - before == (2 if kind == "vlm-own" else 1)


def test_sampling_follows_the_target_with_a_vlm_drafter(family):
    v, pipes = family
    if v != "2":
        pytest.skip("the statistical test runs for one family version")
    pipe = pipes["vlm"]
    image, prompt, temperature, top_p = sample_image(3, 40), "describe the image .", 1.0, 0.95
    p1, p2 = _first_two_token_distributions(pipe, image, prompt, temperature, top_p)
    firsts, seconds = [], []
    for seed in range(600):
        ids = pipe.generate(image, prompt, max_new_tokens=2, temperature=temperature, top_p=top_p,
                            num_draft_tokens=3, seed=seed).token_ids
        firsts.append(ids[0])
        seconds.extend(ids[1:])
    assert _chi2_p(np.bincount(firsts, minlength=len(p1)), p1) > P_MIN
    assert _chi2_p(np.bincount(seconds, minlength=len(p2)), p2) > P_MIN


def test_vlm_drafter_that_is_the_target_accepts_everything(family):
    """The target drafting for itself through the vlm kind: its drafter-side positions and image are right."""
    _, pipes = family
    base = pipes["none"]
    folder = base.target.config._name_or_path
    pipe = mmspec.load(folder, drafter=folder, drafter_kind="vlm", vision_cache=base.vision_cache)
    assert pipe.strategy.shared_vision
    image, prompt = sample_image(1, 56), PROMPTS[1]
    res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=4)
    assert res.token_ids == hf_greedy(base, image, prompt, MAX_NEW)
    # every rejection is at a token the drafter may not propose (padding rows, image placeholders)
    bad = set(torch.nonzero(pipe.strategy.bad_ids).flatten().tolist())
    for r in res.rounds:
        if r.target_token is not None and r.n_accepted < len(r.draft_ids):
            assert r.target_token in bad, res.rounds
    assert res.stats.mean_accepted > 1.5 or res.stats.stop_reason == "eos"
