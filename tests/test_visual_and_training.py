"""The visual drafter (compressed visual tokens) and the drafter distillation trainer."""

from __future__ import annotations

import json

import pytest
import torch

import mmspec
from mmspec.cli import main
from tests.tiny import sample_image
from vision.compress import VisualProjector, pool_tokens


def test_pool_tokens_keeps_the_grid():
    # a 4x4 grid of features whose value is the cell's row: pooled to 2x2, rows stay apart
    feats = torch.arange(4).repeat_interleave(4).float()[:, None].repeat(1, 3)
    pooled = pool_tokens(feats, 4)
    assert pooled.shape == (4, 3)
    assert pooled[:, 0].tolist() == [0.5, 0.5, 2.5, 2.5]
    assert pool_tokens(torch.ones(1, 8), 3).shape == (3, 8)
    assert pool_tokens(torch.randn(10, 8), 3).shape == (3, 8)


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory):
    from vision.scenes import examples_for_scene

    folder = tmp_path_factory.mktemp("scenes")
    for seed in range(6):
        examples_for_scene(seed, kinds=("caption",))[0].image.save(folder / f"scene{seed}.png")
    return folder


def _train(tiny_target, tiny_drafter, data, out, steps, *extra):
    return main(["train-drafter", "--target", str(tiny_target), "--init-drafter", str(tiny_drafter),
                 "--data", str(data), "--out", str(out), "--kind", "visual", "--num-visual-tokens", "4",
                 "--steps", str(steps), "--batch-size", "2", "--checkpoint-every", "2", "--max-new-tokens", "10",
                 "--heldout", "2", "--prompt", "describe the image .", *extra])


def test_train_resume_and_load_visual_drafter(tiny_target, tiny_drafter, scene_folder, tmp_path, capsys):
    out = tmp_path / "visual"
    assert _train(tiny_target, tiny_drafter, scene_folder, out, 2) == 0
    first = torch.load(out / "checkpoint.pt", weights_only=False)
    assert first["step"] == 2 and set(first["modules"]) == {"drafter", "projector"}
    shards = sorted((out / "distill").rglob("shard_*.pt"))
    assert shards
    capsys.readouterr()
    assert _train(tiny_target, tiny_drafter, scene_folder, out, 4, "--resume") == 0
    log = capsys.readouterr().out
    assert "resumed from" in log and "at step 2" in log
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4
    report = json.loads((out / "train_report.json").read_text())
    assert report["outputs_differing_from_target"] == 0 and report["mean_accepted"] >= 1.0

    pipe = mmspec.load(str(tiny_target), drafter=str(out), drafter_kind="visual")
    base = mmspec.load(str(tiny_target), drafter_kind="none")
    for seed in range(3):
        img = sample_image(seed)
        for k in (None, 3):
            res = pipe.generate(img, "describe the image .", max_new_tokens=20, num_draft_tokens=k)
            assert res.token_ids == base.generate(img, "describe the image .", max_new_tokens=20).token_ids
    # the drafter's visual tokens are cached beside the image's features
    before = len(pipe.vision_cache)
    pipe.generate(sample_image(0), "what color is the circle ?", max_new_tokens=4)
    assert len(pipe.vision_cache) == before


def test_visual_tokens_reach_the_drafter(tiny_target, tiny_drafter, tmp_path):
    """Two images give two different draft distributions: the drafter really sees the image."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmspec.drafters.visual import VisualDrafter

    pipe = mmspec.load(str(tiny_target), drafter_kind="none")
    hidden = pipe.target.config.get_text_config().hidden_size
    model = AutoModelForCausalLM.from_pretrained(str(tiny_drafter))
    proj = VisualProjector(hidden, model.config.hidden_size, 4)
    with torch.no_grad():
        proj.fc2.weight.normal_(0, 1.0)
    drafter = VisualDrafter(pipe.adapter, model, AutoTokenizer.from_pretrained(str(tiny_drafter)), proj)
    tokens = []
    for seed in (0, 1):
        req = pipe.adapter.prepare(sample_image(seed), pipe.adapter.format_prompt("describe the image ."))
        pipe.adapter.image_features(req)
        tokens.append(drafter.visual_tokens(req))
    assert tokens[0].shape == (1, 4, model.config.hidden_size)
    assert not torch.allclose(tokens[0], tokens[1])


def test_visual_kind_needs_a_visual_folder(tiny_target, tiny_drafter):
    with pytest.raises(mmspec.MMSpecError, match="not a visual drafter"):
        mmspec.load(str(tiny_target), drafter=str(tiny_drafter), drafter_kind="visual")


def test_open_clip_source(tiny_target, tiny_drafter, tmp_path):
    """Visual tokens from an open_clip encoder (a tiny config, random weights: no download)."""
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "mmspec-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "mmspec-tiny-clip.json")
    out = tmp_path / "clip-drafter"
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(4):
        sample_image(i).save(data / f"{i}.png")
    assert _train(tiny_target, tiny_drafter, data, out, 2, "--visual-source", "open_clip",
                  "--open-clip-model", "mmspec-tiny-clip") == 0
    assert json.loads((out / "mmspec_visual.json").read_text())["source"] == "open_clip"
    pipe = mmspec.load(str(tiny_target), drafter=str(out), drafter_kind="visual")
    base = mmspec.load(str(tiny_target), drafter_kind="none")
    img = sample_image(7)
    assert (pipe.generate(img, "describe the image .", max_new_tokens=16).token_ids
            == base.generate(img, "describe the image .", max_new_tokens=16).token_ids)
    hit = pipe.generate(img, "describe the image .", max_new_tokens=2)
    assert hit.stats.vision_cache_hit
