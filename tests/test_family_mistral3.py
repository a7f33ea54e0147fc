"""Mistral 3 (``mistral3``, Pixtral vision) as an mmspec target: a tiny random config built offline
(``mmspec.tiny.mistral3``). Every drafter kind's greedy output equals ``generate(do_sample=False)`` at batch 1 and
batched with rows of other image sizes, trees too; always-right and never-right drafters; the vision cache (the
shared tests are ``tests.families.checks``'s). Only ``[IMG]`` takes features; ``[IMG_BREAK]`` / ``[IMG_END]`` are text."""

from __future__ import annotations

import pytest

from mmspec.targets.mistral3 import Mistral3Adapter
from mmspec.tiny.mistral3 import build
from tests.families.checks import *  # noqa: F401,F403  (the shared family tests)
from tests.families.checks import family_pipes, images


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return family_pipes(build, tmp_path_factory.mktemp("mistral3"), own=dict(seed=5, vocab_pad=9))


def test_adapter_and_break_tokens_stay_text(pipes):
    adapter = pipes["none"].adapter
    assert isinstance(adapter, Mistral3Adapter)
    req = adapter.prepare(images()[0], adapter.format_prompt("x"))
    brk = adapter.tokenizer.convert_tokens_to_ids("[IMG_BREAK]")
    assert brk in req.prompt_ids and brk not in adapter.image_token_ids
