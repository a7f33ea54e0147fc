"""Checks shared by the issue-26 family tests (tests/test_family_<name>.py): one pipeline per drafter kind on a
tiny target of the family, then the shared checks of ``tests.tiny_families`` (greedy, batched, trees, cache,
self-drafting) plus a drafter that is never right. Builders come from ``mmspec.tiny`` (re-exported by
``tests.families``)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny import sample_image
from tests.tiny_families import PROMPTS, hf_chat, hf_greedy, load_pipes, user


def images():
    """Three sizes (token counts differ per family): 48x48, 64x32, 40x40."""
    return [sample_image(0, 48), sample_image(1, 40).resize((64, 32)), sample_image(2, 40)]


def build_text_drafter(target: Path, folder: Path, seed: int = 1, extra_rows: int = 0) -> Path:
    """A one-layer Qwen2 LM with the target's own tokenizer (as Qwen3-0.6B for Qwen3-VL); ``extra_rows`` pads or
    (negative) trims its vocabulary against the tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(target))
    cfg = Qwen2Config(vocab_size=len(tok) + extra_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def family_pipes(build, root: Path, own: dict | None = None) -> dict:
    """Pipelines over one tiny target built by ``build(folder, **options)``: kinds text, ngram, none, eagle (a
    random head), "vlm" (the target drafting for itself: always right), "vlm-own" (a one-layer VLM of the family
    with its own vision side, built with ``own`` options)."""
    target = build(root / "target")
    text = build_text_drafter(target, root / "text")
    vlm_own = build(root / "vlm-own", layers=1, **(own or {}))
    return load_pipes(target, {"text": text, "ngram": None, "none": None, "vlm": target, "vlm-own": vlm_own})


def check_never_right(base, image, max_new: int, k: int = 4) -> None:
    """A drafter whose every draft is wrong: each round accepts nothing and emits the target's own token."""
    from mmspec.pipeline import Pipeline
    from tests.test_greedy_equality import ScriptedDrafter

    expected = hf_greedy(base, image, PROMPTS[0], max_new)
    pipe = Pipeline(base.adapter, ScriptedDrafter(base.adapter, expected, 0, k))
    res = pipe.generate(image, PROMPTS[0], max_new_tokens=max_new, num_draft_tokens=k)
    assert res.token_ids == expected
    assert all(r.n_accepted == 0 for r in res.rounds) and res.stats.target_forwards == len(expected)


def check_moe_variant(folder: Path, adapter_cls, model_type: str) -> None:
    """A lighter run for a family's MoE variant (same adapter as the dense model): the target drafting for itself
    and a never-right drafter equal ``generate()`` at batch 1, and batched with rows of other image sizes."""
    import mmspec
    from tests.tiny_families import check_batch, check_greedy

    pipe = mmspec.load(str(folder), drafter=str(folder), drafter_kind="vlm")
    assert pipe.target.config.model_type == model_type and isinstance(pipe.adapter, adapter_cls)
    check_greedy(pipe, images()[:2], 3, MAX_NEW)
    check_batch(pipe, images(), 3, MAX_NEW)
    check_never_right(pipe, images()[2], MAX_NEW)


def check_self_drafting_accepts(pipe, image, max_new: int) -> None:
    """The target as its own vlm drafter: output equals generate(), and most drafts are accepted (rejections
    only where the drafter may not propose a token)."""
    expected = hf_greedy(pipe, image, PROMPTS[1], max_new)
    res = pipe.generate(image, PROMPTS[1], max_new_tokens=max_new, num_draft_tokens=4)
    assert res.token_ids == expected
    assert pipe.strategy.shared_vision
    assert res.stats.mean_accepted > 2.5 or res.stats.stop_reason == "eos", res.rounds


# ----------------------------------------------------------------------------------------------------------------
# The tests every family file runs: ``from tests.families.checks import *`` next to a module-scoped ``pipes``
# fixture (``family_pipes``) collects them there, so each family's file adds only what is its own.

MAX_NEW = 12          # > 2 (k + 1) for k = 3
# "vlm" (the target drafting for itself) runs in ``test_always_right_drafter``
KINDS = ["text", "ngram", "none", "vlm-own", "eagle"]


def test_image_token_count_varies_with_size(pipes):
    adapter = pipes["none"].adapter
    counts = {sum(t in adapter.feature_token_ids for t in adapter.prepare(im, adapter.format_prompt("x")).prompt_ids)
              for im in images()}
    assert len(counts) > 1


def test_text_drafter_prompt_has_no_image_slots(pipes):
    adapter = pipes["text"].adapter
    req = adapter.prepare(images()[0], adapter.format_prompt(PROMPTS[1]))
    assert not set(req.text_only_ids) & adapter.image_token_ids and len(req.text_only_ids) < len(req.prompt_ids)


def _param(kind_k):
    import pytest

    return pytest.mark.parametrize("kind", kind_k)


@_param(KINDS)
def test_every_kind_matches_hf_greedy(pipes, kind):
    from tests.tiny_families import check_greedy

    check_greedy(pipes[kind], images()[:2], 3, MAX_NEW)


@_param(["text", "vlm-own", "eagle"])
def test_batched_rows_equal_their_own_generate(pipes, kind):
    from tests.tiny_families import check_batch

    check_batch(pipes[kind], images(), 3, MAX_NEW)


@_param(["vlm-own", "eagle"])
def test_tree_drafts_equal_generate(pipes, kind):
    from tests.tiny_families import check_trees

    check_trees(pipes[kind], images()[:2], MAX_NEW)


def test_always_right_drafter(pipes):
    check_self_drafting_accepts(pipes["vlm"], images()[1], MAX_NEW)


def test_never_right_drafter(pipes):
    check_never_right(pipes["none"], images()[2], MAX_NEW)


def test_vision_cache_serves_the_family(pipes):
    from tests.tiny_families import check_cache_hit

    check_cache_hit(pipes["vlm-own"], "vlm-own", sample_image(7, 48))


def check_trained_drafter(kind: str, target: Path, folder: Path, steps: int = 3) -> None:
    """``mmspec train-drafter --kind KIND`` on a tiny target of the family (a few steps over three images; an
    EAGLE-3 head needs a target of 4+ decoder layers, a visual drafter starts as a new small Llama) writes a
    drafter that loads by its folder, with its kind inferred, and drafts losslessly."""
    import json

    import mmspec
    from mmspec.cli import main

    lines = []
    for seed in range(3):
        sample_image(seed, 40).save(folder / f"img{seed}.png")
        lines.append(json.dumps({"image": f"img{seed}.png", "prompt": PROMPTS[seed % 2]}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    out = folder / kind
    extra = ["--num-visual-tokens", "2", "--hidden-size", "32", "--num-layers", "1"] if kind == "visual" else []
    assert main(["train-drafter", "--kind", kind, "--target", str(target), "--drafter", "none",
                 "--drafter-kind", "none", "--data", str(folder / "data.jsonl"), "--out", str(out),
                 "--steps", str(steps), "--batch-size", "2", "--max-new-tokens", "4", "--heldout", "1",
                 "--save-dtype", "float32", *extra]) == 0
    pipe = mmspec.load(str(target), drafter=str(out), drafter_kind=None if kind == "eagle" else kind)
    assert pipe.drafter_kind == kind
    for image, prompt in zip(images()[1:], PROMPTS):
        res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
        assert res.token_ids == hf_greedy(pipe, image, prompt, MAX_NEW)


def check_trained_eagle(target: Path, folder: Path, steps: int = 3) -> None:
    check_trained_drafter("eagle", target, folder, steps)


def test_train_drafter_eagle_on_the_family(pipes, tmp_path):
    """``train-drafter --kind eagle`` for the family (on a 4-layer target where the fixture's has fewer)."""
    from mmspec.tiny import build_tiny

    config = pipes["none"].target.config
    target = Path(config._name_or_path)
    if config.get_text_config().num_hidden_layers < 4:
        target = build_tiny(config.model_type, tmp_path / "target4", layers=4)
    check_trained_drafter("eagle", target, tmp_path)


def test_train_drafter_visual_on_the_family(pipes, tmp_path):
    """``train-drafter --kind visual`` for the family: the visual tokens pool the target's spliced features
    (Qwen3-VL's DeepStack columns are not among them)."""
    check_trained_drafter("visual", Path(pipes["none"].target.config._name_or_path), tmp_path)


CONV_NEW = 8   # conversations: short answers keep the family tests fast


def family_conversations() -> dict:
    """Issue 28's shapes: text only, two images, two turns with an image in each user turn."""
    a, b, _ = images()
    return {"text only": [user(PROMPTS[1])],
            "two images": [user(a, b, PROMPTS[0])],
            "two turns": [user(a, PROMPTS[1]), {"role": "assistant", "content": "red circle"}, user(b, PROMPTS[0])]}


def test_conversations_equal_generate(pipes):
    """Text only, two images and a two-turn conversation, each greedy-equal to the target's ``generate()`` on
    ``apply_chat_template(messages, add_generation_prompt=True)``, with the target drafting for itself and with an
    eagle head; then one batch mixing those shapes with single-image rows (rows joining mid-flight)."""
    convs = family_conversations()
    refs = {name: hf_chat(pipes["none"], conv, CONV_NEW) for name, conv in convs.items()}
    assert len({tuple(r) for r in refs.values()}) > 1   # the shapes give different answers
    for kind in ("vlm", "eagle"):
        for name, conv in convs.items():
            res = pipes[kind].chat(conv, max_new_tokens=CONV_NEW, num_draft_tokens=3)
            assert res.token_ids == refs[name], (kind, name, res.rounds)
    single = [(images()[2], PROMPTS[0]), (images()[0], PROMPTS[1])]
    rows = [(convs["two images"], None), single[0], (convs["text only"], None), single[1], (convs["two turns"], None)]
    expected = [refs["two images"], hf_chat(pipes["none"], [user(*single[0])], CONV_NEW), refs["text only"],
                hf_chat(pipes["none"], [user(*single[1])], CONV_NEW), refs["two turns"]]
    for kind in ("vlm", "eagle"):
        results = pipes[kind].generate_batch([r[0] for r in rows], [r[1] for r in rows], batch_size=3,
                                             max_new_tokens=CONV_NEW, num_draft_tokens=3)
        assert [r.error for r in results] == [None] * len(rows)
        assert [r.token_ids for r in results] == expected, kind
