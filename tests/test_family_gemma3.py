"""Gemma 3 (``gemma3``) as an mmspec target: a tiny random config built offline (``tests.families.gemma3``: 4 layers,
sliding (window 8) and global alternating, 16 soft tokens per image, prompts of ~30 tokens so the window matters).

The shared family tests (``tests.families.checks``: every drafter kind against ``generate(do_sample=False)`` at
batch 1 and batched with rows of other image sizes, trees, always-right and never-right drafters, the vision cache)
plus what is Gemma 3's own: a Gemma 3 text drafter (sliding layers too: its slot cache applies the window as well),
the window and the bidirectional image block each shown to matter (leave one out and some output differs from
generate(), so these tests would notice its loss), and sampling that follows the target (chi-square, p > 1e-4 as in
tests/test_sampling.py; seeded, so deterministic).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

import mmspec
from mmspec.kv import SlotCache
from mmspec.targets.gemma3 import Gemma3Adapter
from tests.families import gemma3
from tests.families.checks import *  # noqa: F401,F403  (the shared family tests)
from tests.families.checks import MAX_NEW, check_trained_eagle, family_pipes, images
from tests.test_sampling import P_MIN, _chi2_p, _first_two_token_distributions
from tests.tiny_families import PROMPTS, check_batch, check_greedy, hf_greedy, run_engine


def build_gemma_text_drafter(target, folder, seed: int = 2):
    """A two-layer Gemma 3 text LM (one sliding layer, window 4) with the target's tokenizer, as Gemma 3 1B drafts
    for 4B: its decoder takes a mask per layer type too."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(target))
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                           max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    Gemma3ForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    out = family_pipes(gemma3.build, root, own=dict(seed=5, vocab_pad=9))
    target = out["none"].target.config._name_or_path
    out["text-gemma"] = mmspec.load(target, drafter=str(build_gemma_text_drafter(target, root / "text-gemma")),
                                    drafter_kind="text")
    return out


def test_adapter_and_window(pipes):
    adapter = pipes["none"].adapter
    assert isinstance(adapter, Gemma3Adapter)
    adapter.check_generation_config()          # sliding layers are no longer refused
    slots = SlotCache(adapter.model.config.get_text_config(), adapter.device, torch.float32)
    assert slots.window == 8 and slots.layer_types == ["full_attention", "sliding_attention"]
    req = adapter.prepare(images()[0], adapter.format_prompt(PROMPTS[0]))
    assert len(req.prompt_ids) > 3 * slots.window    # the window is smaller than the prompt
    groups = adapter.attention_groups(req)
    image = torch.tensor(req.prompt_ids) == adapter.model.config.image_token_id
    assert (groups >= 0).equal(image) and int(groups.max()) == 0     # one image, one group


def test_image_token_count_varies_with_size(pipes):
    """Overrides the shared test: Gemma 3 resizes every image to its tower's size (pan-and-scan off), so each
    image size gives ``mm_tokens_per_image`` soft tokens."""
    adapter = pipes["none"].adapter
    image_id = adapter.model.config.image_token_id
    counts = {adapter.prepare(im, adapter.format_prompt("x")).prompt_ids.count(image_id) for im in images()}
    assert counts == {adapter.model.config.mm_tokens_per_image}


def test_gemma_text_drafter_matches_hf_greedy(pipes):
    pipe = pipes["text-gemma"]
    slots = pipe.strategy.batch().slots
    assert slots.window == 4 and not pipe.strategy.lean_step
    check_greedy(pipe, images()[:1], 3, MAX_NEW)


def _outputs(pipe):
    return [pipe.generate(im, PROMPTS[i], max_new_tokens=MAX_NEW).token_ids for i, im in enumerate(images()[:2])]


def test_window_and_image_block_matter(pipes):
    """Each of the two Gemma-3 mask terms, left out, changes some output against generate()."""
    pipe = pipes["none"]
    expected = [hf_greedy(pipe, im, PROMPTS[i], MAX_NEW) for i, im in enumerate(images()[:2])]
    assert _outputs(pipe) == expected
    everywhere = lambda self, positions: torch.ones(1, dtype=torch.bool, device=self.device)  # noqa: E731
    with mock.patch.object(SlotCache, "_in_window", everywhere):
        assert _outputs(pipe) != expected
    with mock.patch.object(Gemma3Adapter, "attention_groups", lambda self, request: None):
        assert _outputs(pipe) != expected


@pytest.mark.parametrize("kind", ["text", "vlm"])
def test_batched_rows_equal_their_own_generate(pipes, kind):
    """Overrides the shared test with two kinds (rejections under holes; long accepted chains), to stay fast."""
    check_batch(pipes[kind], images(), 3, MAX_NEW)


def test_tree_drafts_equal_generate(pipes):
    """Overrides the shared test with a lighter one: bushy trees (no probability floor) of a smaller Gemma 3 VLM,
    which grows them under the window too, at batch 1 and batched; some rounds verify a branching tree."""
    pipe = pipes["vlm-own"]
    floor, pipe.strategy.tree_floor = pipe.strategy.tree_floor, 0.0
    try:
        expected = [hf_greedy(pipe, im, PROMPTS[i], MAX_NEW) for i, im in enumerate(images()[:2])]
        settings = dict(max_new_tokens=MAX_NEW, tree_nodes=8, num_draft_tokens=4)
        res = pipe.generate(images()[0], PROMPTS[0], **settings)
        assert res.token_ids == expected[0]
        assert any(r.parents is not None and len(set(r.parents)) < len(r.parents) for r in res.rounds), res.rounds
        batched = pipe.generate_batch(images()[:2], PROMPTS[:2], batch_size=2, **settings)
        assert [r.token_ids for r in batched] == expected
    finally:
        pipe.strategy.tree_floor = floor


def test_sampling_follows_the_target(pipes):
    """Seeded rows (each its own generator) in batches: the first two emitted tokens follow the target's exact
    distribution (a random text drafter, so drafts are rejected and resampled)."""
    pipe = pipes["text"]
    image, prompt, temperature, top_p = images()[0], PROMPTS[1], 1.0, 0.95
    p1, p2 = _first_two_token_distributions(pipe, image, prompt, temperature, top_p)
    settings = dict(max_new_tokens=2, temperature=temperature, top_p=top_p, num_draft_tokens=3)
    jobs = [pipe._job(image, prompt, dict(settings, seed=seed)) for seed in range(300)]
    run_engine(pipe, jobs, max_batch=50)
    firsts = [j.result.token_ids[0] for j in jobs]
    seconds = [t for j in jobs for t in j.result.token_ids[1:2]]
    assert _chi2_p(np.bincount(firsts, minlength=len(p1)), p1) > P_MIN
    assert _chi2_p(np.bincount(seconds, minlength=len(p2)), p2) > P_MIN


def test_train_drafter_eagle_on_the_family(pipes, tmp_path):
    """``mmspec train-drafter --kind eagle`` trains a head for this family (a few steps), and the head drafts
    losslessly."""
    check_trained_eagle(pipes["none"].target.config._name_or_path, tmp_path)
