"""Loading options and the console script's help."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mmspec
from tests.tiny import sample_image


def test_device_map_auto_and_dtype(tiny_target, tiny_drafter):
    """device_map="auto" (accelerate) and an explicit dtype load and still match the target's own generate."""
    pipe = mmspec.load(str(tiny_target), drafter=str(tiny_drafter), device_map="auto", dtype="float32")
    ref = mmspec.load(str(tiny_target), drafter_kind="none")
    img = sample_image(4)
    assert (pipe.generate(img, "describe the image .", max_new_tokens=12).token_ids
            == ref.generate(img, "describe the image .", max_new_tokens=12).token_ids)
    assert pipe.target.device.type == "cpu"  # accelerate placed it on the only device there is


def test_bfloat16_runs(tiny_target, tiny_drafter):
    pipe = mmspec.load(str(tiny_target), drafter=str(tiny_drafter), dtype="bfloat16")
    assert pipe.target.dtype.is_floating_point and str(pipe.target.dtype) == "torch.bfloat16"
    res = pipe.generate(sample_image(0), "describe the image .", max_new_tokens=6)
    assert 1 <= len(res.token_ids) <= 6


def test_unknown_preset():
    with pytest.raises(mmspec.MMSpecError, match="unknown preset"):
        mmspec.load(preset="no-such-pair")


@pytest.mark.parametrize("command", [[], ["caption"], ["demo"], ["bench"], ["train-drafter"]])
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "mmspec.cli", *command, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: mmspec" in out.stdout
    if command:
        assert "--target" in out.stdout and "--drafter-kind" in out.stdout
