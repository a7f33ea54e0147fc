"""InternVL 3.x (``internvl``, transformers' own format, Qwen2 decoder) as an mmspec target: a tiny random config
built offline (``mmspec.tiny.internvl``: 16 px tiles + thumbnail, pixel shuffle to 4 tokens per tile). Every drafter
kind's greedy output equals ``generate(do_sample=False)`` at batch 1 and batched with rows of other image sizes,
trees too; always-right and never-right drafters; the vision cache (``tests.families.checks``)."""

from __future__ import annotations

import pytest

from mmspec.targets.internvl import InternVLAdapter
from mmspec.tiny.internvl import build
from tests.families.checks import *  # noqa: F401,F403  (the shared family tests)
from tests.families.checks import family_pipes, images


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return family_pipes(build, tmp_path_factory.mktemp("internvl"), own=dict(seed=5, vocab_pad=3))


def test_adapter_and_tiles(pipes):
    adapter = pipes["none"].adapter
    assert isinstance(adapter, InternVLAdapter)
    # a square image is 2x2 tiles + a thumbnail, 4 tokens each; a 64x32 one 2x1 + a thumbnail
    counts = [sum(t in adapter.feature_token_ids for t in adapter.prepare(im, adapter.format_prompt("x")).prompt_ids)
              for im in images()[:2]]
    assert counts == [20, 12]
