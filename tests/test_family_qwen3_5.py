"""Qwen3.5 (``qwen3_5``) as an mmspec target: a tiny random config built offline (``tests.families.qwen3_5``: Gated
DeltaNet linear-attention layers around a gated full-attention layer, M-RoPE, a Qwen3-VL-like vision side).

The shared family tests that apply (``tests.families.checks``: every drafter kind against
``generate(do_sample=False)``, batched rows with other image sizes, always-right and never-right drafters, the
vision cache) plus what is Qwen3.5's own: the recurrent-state rollback tested directly (after rejected drafts and
padding, each row's conv and recurrent states equal those of a fresh forward over the tokens it kept, and they
differ from the un-rolled-back ones, so the test would notice), a rollback by ``truncate`` (session logits against
transformers' uncached forward), and trees refused with a clear error.
"""

from __future__ import annotations

import pytest
import torch

from mmspec.errors import MMSpecError
from mmspec.targets.batch import TargetBatch
from mmspec.targets.qwen3_5 import Qwen3_5Adapter
from tests.families import qwen3_5
from tests.families.checks import (MAX_NEW, check_trained_eagle, family_pipes, images,  # noqa: F401
                                   test_always_right_drafter, test_conversations_equal_generate,
                                   test_image_token_count_varies_with_size, test_never_right_drafter,
                                   test_text_drafter_prompt_has_no_image_slots, test_train_drafter_visual_on_the_family,
                                   test_vision_cache_serves_the_family)
from tests.tiny_families import PROMPTS, check_batch, check_greedy, check_session_logits


def build(folder, layers: int | None = None, **options):
    """``family_pipes``' builder: ``layers`` picks the first layer types of linear, full, linear."""
    if layers is not None and "layer_types" not in options:
        options["layer_types"] = ("linear_attention", "full_attention", "linear_attention")[:max(layers, 2)]
    return qwen3_5.build(folder, **options)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return family_pipes(build, tmp_path_factory.mktemp("qwen3_5"), own=dict(seed=5, vocab_pad=9))


def _states(slots, row):
    """Row ``row``'s (conv, recurrent) state of every linear-attention layer (the conv state: the last kernel-size
    inputs; right after a forward the layer still holds all of the forward's inputs)."""
    b = slots.index(row)
    return [(layer.conv_states[0][b, :, -layer.conv_kernel_size[0]:].clone(), layer.recurrent_states[0][b].clone())
            for layer in slots._linear_layers()]


def _same(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_rollback_equals_a_fresh_forward(pipes):
    adapter = pipes["none"].adapter
    assert isinstance(adapter, Qwen3_5Adapter)
    reqs = [adapter.prepare(im, adapter.format_prompt(PROMPTS[i])) for i, im in enumerate(images()[:2])]
    words = [adapter.tokenizer.convert_tokens_to_ids(t) for t in adapter.tokenizer.tokenize(" the red circle is big")]
    drafts = [words[i % len(words)] for i in range(8)]
    kept = {0: [reqs[0].prompt_ids[-1]], 1: [reqs[1].prompt_ids[-1]]}
    with torch.inference_mode():
        batch = TargetBatch(adapter)
        for r, req in enumerate(reqs):
            adapter.image_features(req)
            batch.add(r, req)
        # round 1, the rows' prefill: row 0 keeps its pending token and one draft of four, row 1 the pending only
        batch.verify({r: torch.tensor(kept[r] + drafts[:4]) for r in kept})
        batch.commit({0: [0, 1], 1: [0]})
        kept[0] += drafts[:1]
        # round 2, in the shared cache: row 0 feeds 3 (keeps 2, then padding), row 1 feeds 5 (keeps 4)
        feed = {0: drafts[4:7], 1: drafts[1:6]}
        batch.verify({r: torch.tensor(v) for r, v in feed.items()})
        raw = {r: _states(batch.main, r) for r in feed}          # what a forward leaves without the rollback
        batch.commit({0: [0, 1], 1: [0, 1, 2, 3]})
        kept[0] += feed[0][:2]
        kept[1] += feed[1][:4]
        for r, req in enumerate(reqs):
            fresh = TargetBatch(adapter)
            fresh.add(0, req)
            fresh.verify({0: torch.tensor(kept[r])})
            fresh.commit({0: range(len(kept[r]))})
            assert fresh.main.length(0) == batch.main.length(r)
            ref = _states(fresh.main, 0)
            assert _same(_states(batch.main, r), ref), r
            assert not _same(raw[r], ref), r
            # and the next token's logits agree
            nxt = torch.tensor([drafts[7]])
            a = batch.verify({r: nxt})[r]
            b = fresh.verify({0: nxt})[0]
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
            batch.commit({r: [0]})
            fresh.commit({0: [0]})


def test_truncate_rolls_the_state_back(pipes):
    check_session_logits(pipes["none"], images()[0])


def test_trees_are_refused(pipes):
    """Up front, whatever the drafter would grow; and by the slot cache itself, for a tree given to a verify."""
    for kind in ("vlm-own", "eagle", "text"):
        with pytest.raises(MMSpecError, match="linear-attention"):
            pipes[kind].generate(images()[0], PROMPTS[0], max_new_tokens=4, tree_nodes=4)
    adapter = pipes["none"].adapter
    req = adapter.prepare(images()[0], adapter.format_prompt(PROMPTS[0]))
    adapter.image_features(req)
    batch = TargetBatch(adapter)
    batch.add(0, req)
    with torch.inference_mode(), pytest.raises(MMSpecError, match="linear-attention"):
        batch.verify({0: torch.tensor([req.prompt_ids[-1], 5, 6])}, {0: [-1, 0, 0]})    # two siblings


@pytest.mark.parametrize("kind", ["text", "vlm"])
def test_batched_rows_equal_their_own_generate(pipes, kind):
    """Rows of other image sizes in one batch (padding after short rows, rows feeding nothing): each row's state
    stays its own. Two kinds (rejections; long accepted chains), to stay fast."""
    check_batch(pipes[kind], images(), 3, MAX_NEW)


def test_train_drafter_eagle_on_the_family(tmp_path):
    """On a four-layer target in the hub's layout (three linear-attention layers, then a full one)."""
    layers = ("linear_attention",) * 3 + ("full_attention",)
    check_trained_eagle(qwen3_5.build(tmp_path / "target", layer_types=layers), tmp_path)


@pytest.mark.parametrize("kind", ["text", "ngram", "none", "vlm", "vlm-own", "eagle"])
def test_every_kind_matches_hf_greedy(pipes, kind):
    """Overrides the shared test with one image per kind (the batched tests take all three sizes), to stay fast:
    the linear layers run transformers' torch reference kernels on CPU."""
    check_greedy(pipes[kind], images()[1:2], 3, MAX_NEW)
