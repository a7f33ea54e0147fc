"""GLM-4.1V (``glm4v``) as an mmspec target: a tiny random config built offline (``mmspec.tiny.glm4v``: 3-D M-RoPE
on half of each head, three end-of-sequence ids). Every drafter kind's greedy output equals
``generate(do_sample=False)`` at batch 1 and batched with rows of other image sizes, trees too; always-right and
never-right drafters; the vision cache (``tests.families.checks``); and the 3-D positions matter."""

from __future__ import annotations

import pytest

from mmspec.targets.base import Positions
from mmspec.targets.glm4v import Glm4vAdapter
from mmspec.tiny.glm4v import build
from tests.families.checks import *  # noqa: F401,F403  (the shared family tests)
from tests.families.checks import MAX_NEW, check_moe_variant, family_pipes, images
from tests.tiny_families import PROMPTS, hf_greedy


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return family_pipes(build, tmp_path_factory.mktemp("glm4v"), own=dict(seed=5, vocab_pad=3))


def test_adapter_and_three_eos(pipes):
    adapter = pipes["none"].adapter
    assert isinstance(adapter, Glm4vAdapter)
    assert len(adapter.eos_token_ids) == 3


def test_one_dimensional_positions_would_differ(pipes, monkeypatch):
    """The test above would notice lost 3-D positions: with plain 1-D ones some output differs from generate()."""
    pipe = pipes["none"]
    expected = [hf_greedy(pipe, im, PROMPTS[0], MAX_NEW) for im in images()]
    monkeypatch.setattr(Glm4vAdapter, "positions", lambda self, request: Positions())
    got = [pipe.generate(im, PROMPTS[0], max_new_tokens=MAX_NEW).token_ids for im in images()]
    assert got != expected


def test_glm4v_moe_matches_generate(tmp_path):
    """GLM-4.5V's ``glm4v_moe`` (routed and shared experts) through the same adapter."""
    check_moe_variant(build(tmp_path / "moe", moe=True, seed=13), Glm4vAdapter, "glm4v_moe")
