"""LLaVA-NeXT and LLaVA-OneVision targets: anyres tiles, image-size-dependent token counts, packed features.

Greedy output of every drafter kind (text, ngram, none, vlm with a shared and with its own vision tower) equals the
target's own ``generate(do_sample=False)`` with an image, a padded vocabulary and max_new_tokens > 2(k+1); session
logits over several new tokens and after a rollback equal HF's uncached forward; the vision cache hits on a
second request.
"""

from __future__ import annotations

import pytest

from mmspec.targets.llava_next import LlavaNextAdapter
from tests.tiny import build_tiny_text_drafter, make_tokenizer, sample_image
from tests.tiny_families import (KINDS, build_tiny_llava_next, check_batch, check_cache_hit, check_trees, check_greedy,
                                 check_padded_vocabularies, check_self_drafting, check_session_logits,
                                 check_vlm_tree_node_logits, load_pipes)

MAX_NEW = 20


def images():
    # different sizes and aspect ratios pick different anyres grids, hence different image-token counts
    return [sample_image(1, 40).resize((20, 50)), sample_image(3, 40).resize((64, 20)), sample_image(0, 24)]


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def family(request, tmp_path_factory):
    ov = request.param == "llava_onevision"
    root = tmp_path_factory.mktemp(request.param)
    target = build_tiny_llava_next(root / "target", vocab_pad=5, seed=0, onevision=ov)
    words_tok = make_tokenizer(extra_image_token=False)
    text = build_tiny_text_drafter(root / "text", vocab_rows=len(words_tok))
    vlm = build_tiny_llava_next(root / "vlm", vocab_pad=2, seed=3, layers=1, onevision=ov, vision_from=target)
    vlm_own = build_tiny_llava_next(root / "vlm-own", vocab_pad=9, seed=4, layers=1, onevision=ov)
    pipes = load_pipes(target, {"text": text, "ngram": None, "none": None, "vlm": vlm, "vlm-own": vlm_own})
    return request.param, pipes


def test_adapter_and_padded_vocabularies(family):
    name, pipes = family
    assert isinstance(pipes["none"].adapter, LlavaNextAdapter)
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


def test_vlm_drafter_for_plain_llava(tmp_path):
    """The vlm kind also drafts for LLaVA-1.5-style targets (whose adapter keeps no prompt text)."""
    import mmspec
    from tests.tiny import build_tiny_llava

    folder = build_tiny_llava(tmp_path / "llava")
    check_self_drafting(mmspec.load(str(folder), drafter=None, drafter_kind="none"), sample_image(2), MAX_NEW)


def test_vlm_drafter_of_another_family_is_refused(family, tmp_path):
    import mmspec
    from mmspec.errors import MMSpecError
    from tests.tiny_families import build_tiny_qwen_vl

    _, pipes = family
    other = build_tiny_qwen_vl(tmp_path / "qwen", layers=1)
    with pytest.raises(MMSpecError, match="family"):
        mmspec.load(pipes["none"].target.config._name_or_path, drafter=str(other), drafter_kind="vlm")


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
