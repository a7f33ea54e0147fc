"""Qwen2-VL and Qwen2.5-VL targets: M-RoPE positions, variable image-token counts, padded vocabularies.

Greedy output of every drafter kind (text, ngram, none, vlm with a shared and with its own vision tower) equals the
target's own ``generate(do_sample=False)`` with an image and max_new_tokens > 2(k+1); session logits over several
new tokens and after a rollback equal HF's uncached forward; the vision cache hits on a second request; sampling is
lossless (chi-square of the first two generated tokens against the exact target distribution, p > 1e-4 as in
tests/test_sampling.py: a correct sampler fails once in 10,000 runs; generators are seeded, so it is deterministic).
"""

from __future__ import annotations

import numpy as np
import pytest

from mmspec.targets.qwen2_vl import Qwen2VLAdapter
from tests.test_sampling import P_MIN, _chi2_p, _first_two_token_distributions
from tests.tiny import sample_image
from tests.tiny_families import (KINDS, build_tiny_qwen_text_drafter, build_tiny_qwen_vl, check_batch, check_cache_hit, check_trees,
                                 check_greedy, check_padded_vocabularies, check_self_drafting, check_session_logits,
                                 check_vlm_tree_node_logits, load_pipes, qwen_tokenizer)

MAX_NEW = 20          # > 2 (k + 1) for every k used here


def images():
    # (32x64 and 24x24: 20 new tokens from both tiny targets without an early end-of-sequence)
    return [sample_image(0, 40).resize((32, 64)), sample_image(1, 24), sample_image(2, 40)]


@pytest.fixture(scope="module", params=["2", "2.5"])
def family(request, tmp_path_factory):
    v = request.param
    root = tmp_path_factory.mktemp(f"qwen{v}")
    target = build_tiny_qwen_vl(root / "target", version=v, vocab_pad=7, seed=0)
    text = build_tiny_qwen_text_drafter(root / "text", vocab_rows=len(qwen_tokenizer()))  # fewer rows
    vlm = build_tiny_qwen_vl(root / "vlm", version=v, vocab_pad=2, seed=3, layers=1, vision_from=target)
    vlm_own = build_tiny_qwen_vl(root / "vlm-own", version=v, vocab_pad=11, seed=4, layers=1)  # more rows
    wide = build_tiny_qwen_text_drafter(root / "text-wide", vocab_rows=len(qwen_tokenizer()) + 20)  # more rows
    pipes = load_pipes(target, {"text": text, "ngram": None, "none": None, "vlm": vlm, "vlm-own": vlm_own,
                                "text-wide": wide})
    return v, pipes


def test_adapter_and_padded_vocabularies(family):
    v, pipes = family
    assert isinstance(pipes["none"].adapter, Qwen2VLAdapter)
    assert pipes["none"].target.config.model_type == {"2": "qwen2_vl", "2.5": "qwen2_5_vl"}[v]
    check_padded_vocabularies(pipes)
    assert pipes["text-wide"].drafter.get_output_embeddings().weight.shape[0] > pipes["none"].adapter.vocab_size


def test_image_token_count_varies_with_size(family):
    _, pipes = family
    adapter = pipes["none"].adapter
    counts = {sum(t in adapter.image_token_ids for t in adapter.prepare(im, adapter.format_prompt("x")).prompt_ids)
              for im in images()}
    assert len(counts) == len(images())


def test_text_drafter_sees_one_dimensional_prompt(family):
    _, pipes = family
    adapter = pipes["text"].adapter
    req = adapter.prepare(images()[0], adapter.format_prompt("describe the image ."))
    assert not set(req.text_only_ids) & adapter.image_token_ids
    assert len(req.text_only_ids) < len(req.prompt_ids)


@pytest.mark.parametrize("kind", KINDS + ["text-wide"])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_every_kind_matches_hf_greedy(family, kind, k):
    _, pipes = family
    check_greedy(pipes[kind], images()[:2], k, MAX_NEW)


def test_session_logits_equal_hf_forward_after_rollback(family):
    _, pipes = family
    check_session_logits(pipes["none"], images()[0])


@pytest.mark.parametrize("kind", ["none", "vlm", "vlm-own"])
def test_vision_cache_hit_on_second_request(family, kind):
    _, pipes = family
    check_cache_hit(pipes[kind], kind, sample_image(7, 48))


def test_vlm_drafter_that_is_the_target_accepts_everything(family):
    _, pipes = family
    check_self_drafting(pipes["none"], images()[1], MAX_NEW)


@pytest.mark.parametrize("kind", ["vlm", "text-wide"])
def test_sampling_follows_the_target(family, kind):
    v, pipes = family
    if v != "2":
        pytest.skip("the statistical test runs for one family version")
    pipe = pipes[kind]
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [None, 3])
def test_batched_rows_equal_their_own_generate(family, kind, k):
    _, pipes = family
    check_batch(pipes[kind], images(), k, MAX_NEW)


@pytest.mark.parametrize("kind", ["text", "eagle", "vlm", "vlm-own"])
def test_tree_drafts_equal_generate(family, kind):
    _, pipes = family
    check_trees(pipes[kind], images(), MAX_NEW)


def test_vlm_tree_nodes_see_their_own_path(family):
    _, pipes = family
    check_vlm_tree_node_logits(pipes["none"], images())
