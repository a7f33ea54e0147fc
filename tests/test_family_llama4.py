"""Llama 4 (``llama4``) is refused up front, with the reason and the supported types: transformers 5.24's own
``generate()`` fails on it (tests/families/NOTES.md), so there is no reference output to be lossless against."""

from __future__ import annotations

import pytest

import mmspec
from mmspec.errors import MMSpecError
from tests.families import builder


def test_llama4_is_refused_with_the_reason(tmp_path):
    folder = builder("llama4")(tmp_path / "llama4")
    with pytest.raises(MMSpecError) as err:
        mmspec.load(str(folder), drafter=None, drafter_kind="none")
    msg = str(err.value)
    assert "'llama4' is not supported" in msg and "generate()" in msg and "image_outputs" in msg
    assert "qwen3_vl" in msg and "internvl" in msg      # what is supported instead
