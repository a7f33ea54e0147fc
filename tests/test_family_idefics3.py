"""Idefics3 and SmolVLM targets: images split into tiles (plus a global view) with ``pixel_attention_mask``.

Greedy output of every drafter kind (text, ngram, none, vlm with a shared and with its own vision tower) equals the
target's own ``generate(do_sample=False)`` with an image, a padded vocabulary and max_new_tokens > 2(k+1); session
logits over several new tokens and after a rollback equal HF's uncached forward; the vision cache hits on a second
request. (Without the optional ``num2words`` package the tiny SmolVLM is saved with Idefics3's processor, which
lays image tiles out the same way; see tests/tiny_families.py.)
"""

from __future__ import annotations

import pytest

from mmspec.targets.idefics3 import Idefics3Adapter
from tests.tiny import build_tiny_text_drafter, sample_image
from tests.tiny_families import (IDEFICS_ADDED, KINDS, build_tiny_idefics3, check_batch, check_cache_hit, check_trees, check_greedy,
                                 check_padded_vocabularies, check_self_drafting, check_session_logits,
                                 check_vlm_tree_node_logits, idefics_tokenizer, load_pipes)

MAX_NEW = 20


def images():
    # 2x2 tiles + global view, 1x2 tiles + global view: different image-token counts
    return [sample_image(1, 40), sample_image(2, 40).resize((20, 40))]


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def family(request, tmp_path_factory):
    sm = request.param == "smolvlm"
    root = tmp_path_factory.mktemp(request.param)
    target = build_tiny_idefics3(root / "target", smolvlm=sm, vocab_pad=5, seed=0)
    # a text drafter with the target's words but none of its image tokens (like SmolLM2 for SmolVLM)
    n_words = len(idefics_tokenizer()) - len(IDEFICS_ADDED)
    from tests.tiny import WORDS

    text = build_tiny_text_drafter(root / "text", words=WORDS, vocab_rows=n_words)
    vlm = build_tiny_idefics3(root / "vlm", smolvlm=sm, vocab_pad=2, seed=3, layers=1, vision_from=target)
    vlm_own = build_tiny_idefics3(root / "vlm-own", smolvlm=sm, vocab_pad=9, seed=4, layers=1)
    pipes = load_pipes(target, {"text": text, "ngram": None, "none": None, "vlm": vlm, "vlm-own": vlm_own})
    return request.param, pipes


def test_adapter_and_padded_vocabularies(family):
    name, pipes = family
    assert isinstance(pipes["none"].adapter, Idefics3Adapter)
    assert pipes["none"].target.config.model_type == name
    check_padded_vocabularies(pipes)


def test_image_token_count_varies_with_size(family):
    _, pipes = family
    adapter = pipes["none"].adapter
    counts = {sum(t in adapter.image_token_ids for t in adapter.prepare(im, adapter.format_prompt("x")).prompt_ids)
              for im in images()}
    assert len(counts) == len(images())


@pytest.mark.parametrize("kind", KINDS)
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
