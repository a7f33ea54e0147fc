"""Loading options and the console script's help."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import mmspec
from tests.tiny import sample_image

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("command", [[], ["caption"], ["demo"], ["bench"], ["train-drafter"], ["serve"]])
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "mmspec.cli", *command, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: mmspec" in out.stdout
    if command:
        assert "--target" in out.stdout and "--drafter-kind" in out.stdout


def test_readme_presets_table_is_the_presets():
    """``--preset``'s help points to the README's table: one row per ``PRESETS`` entry, as it is."""
    from mmspec.presets import PRESETS

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Presets"):]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) == len(PRESETS)
    for name, p in PRESETS.items():
        assert f"| `{name}` | `{p.target}` | `{p.drafter}` | {p.drafter_kind} | {p.dtype} | {p.needs} |" in rows


def test_readme_python_api_example_runs(monkeypatch, capsys):
    """The README's Python API example, as printed there, on the bundled models."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "tokens in" in out and "per forward" in out and "eos" in out


def test_model_flags_map_onto_load():
    """The shared model flags, defined once, turn into ``mmspec.load``'s keywords ('none' is no drafter model)."""
    import argparse

    from mmspec.model_flags import add_model_flags, load_kwargs

    parser = argparse.ArgumentParser()
    dests = add_model_flags(parser)
    args = parser.parse_args(["--target", "org/vlm", "--drafter", "None", "--drafter-kind", "ngram", "--dtype", "bf16"])
    assert load_kwargs(args) == dict(target="org/vlm", preset=None, drafter=None, drafter_kind="ngram", device="cpu",
                                     dtype="bf16", device_map=None, trust_remote_code=False)
    assert set(dests) == set(load_kwargs(args))


def test_registry_reads_what_it_knows_from_the_drafter_classes():
    from mmspec.drafters import DRAFTER_KINDS, drafter_class, tree_kinds, weightless_kinds

    for kind in DRAFTER_KINDS:
        assert drafter_class(kind).kind == kind
    assert tree_kinds() == sorted(k for k in DRAFTER_KINDS if drafter_class(k).grows_trees)
    assert set(tree_kinds()) == {"eagle", "layerskip", "text", "visual", "vlm"}
    assert weightless_kinds() == ["layerskip", "ngram", "none"]
    with pytest.raises(mmspec.MMSpecError, match="unknown drafter kind 'nope'"):
        drafter_class("nope")


def test_the_registry_and_the_model_flags_import_no_torch():
    """Every subcommand adds the model flags (and their list of kinds) while ``--help`` prints: no torch."""
    code = "import sys, mmspec.model_flags, mmspec.drafters; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_with_drafter_kind_shares_the_target_and_loads_weights(tiny_target, tiny_drafter):
    """The one way to put another drafter on a loaded target: same weights, same image cache unless asked."""
    base = mmspec.load(str(tiny_target), drafter_kind="none")
    text = base.with_drafter_kind("text", drafter=str(tiny_drafter))
    assert text.adapter is base.adapter and text.drafter_kind == "text" and text.drafter is not None
    img = sample_image(1)
    assert (text.generate(img, "describe the image .", max_new_tokens=12, num_draft_tokens=3).token_ids
            == base.generate(img, "describe the image .", max_new_tokens=12).token_ids)
    own = base.with_drafter_kind("ngram", own_vision_cache=True)
    assert own.target is base.target and own.vision_cache is not base.vision_cache
    with pytest.raises(mmspec.MMSpecError, match="needs weights"):
        base.with_drafter_kind("text")
