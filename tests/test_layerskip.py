"""The ``layerskip`` drafter (self-speculation: the target drafts with some of its own layers skipped).

Lossless greedy (against the target's own ``generate()``) at batch 1, batched and with trees on four families of
tiny 4-layer targets (LLaVA, Qwen2-VL with M-RoPE, Idefics3 with tiles, Mistral 3 / Pixtral); the same drafter with
nothing skipped is the target itself, so every draft it makes passes (positions, cache and image plumbing); sampling
follows the target (chi-square, as tests/test_sampling.py); the image is encoded once; the search of
``mmspec tune-layerskip`` finds the identity layers of a constructed target; skip sets that do not fit are refused.
"""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch

import mmspec
from mmspec.drafters import tree_kinds, weightless_kinds
from mmspec.drafters.layerskip import BUNDLED_SKIP_SET, AdaptiveStop, LayerSkipDrafter, default_skip, write_skip_file
from mmspec.errors import MMSpecError
from tests.test_sampling import P_MIN, _chi2_p, _first_two_token_distributions
from tests.tiny import build_tiny_llava, sample_image
from tests.tiny_families import PROMPTS, build_tiny_idefics3, build_tiny_qwen_vl, check_batch, check_greedy, \
    hf_greedy

MAX_NEW = 16
LAYERS = 4


def images():
    return [sample_image(0, 40).resize((32, 48)), sample_image(1, 32), sample_image(2, 40)]


def _build(family: str, folder):
    if family == "llava":
        return build_tiny_llava(folder, layers=LAYERS)
    if family == "qwen2_vl":
        return build_tiny_qwen_vl(folder, layers=LAYERS)
    if family == "idefics3":
        return build_tiny_idefics3(folder, layers=LAYERS)
    from mmspec.tiny.mistral3 import build

    return build(folder, layers=LAYERS)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "idefics3", "mistral3"])
def family(request, tmp_path_factory):
    folder = _build(request.param, tmp_path_factory.mktemp(request.param) / "target")
    return request.param, mmspec.load(str(folder), drafter=None, drafter_kind="layerskip")


def test_registry_and_untuned_default(family):
    _, pipe = family
    assert "layerskip" in weightless_kinds() and "layerskip" in tree_kinds()
    assert pipe.strategy.skip == default_skip(LAYERS) == [1] and pipe.strategy.source == "untuned"
    assert default_skip(16) == [1, 3, 5, 7, 9, 11, 13] and default_skip(2) == [1]
    # no weights of its own: the skip view's parameters are the target's, minus the skipped layers'
    target_params = {p.data_ptr() for p in pipe.target.parameters()}
    view_params = [p.data_ptr() for p in pipe.strategy.view.parameters()]
    assert set(view_params) <= target_params
    assert len(pipe.strategy.view.layers) == LAYERS - 1 and len(pipe.strategy.decoder.layers) == LAYERS


def test_greedy_batched_and_trees_equal_generate(family):
    """Chains at batch 1 (adaptive and fixed k), batched rows joining mid-flight (with a bad input among them),
    and trees at batch 1 and batched: every output is the target's own greedy one."""
    name, pipe = family
    check_greedy(pipe, images()[:2], 3, MAX_NEW)
    if name != "llava":   # (the full set of checks once; the other families take the lighter ones)
        expected = [hf_greedy(pipe, im, p, MAX_NEW) for im, p in zip(images()[:2], PROMPTS)]
        trees = pipe.generate_batch(images()[:2], PROMPTS, batch_size=2, max_new_tokens=MAX_NEW, tree_nodes=8,
                                    num_draft_tokens=3)
        assert [r.token_ids for r in trees] == expected
        return
    check_greedy(pipe, images()[:1], None, MAX_NEW)
    check_batch(pipe, images(), 3, MAX_NEW)
    # bushy trees (no probability floor: branches everywhere) at batch 1 and batched
    expected = [hf_greedy(pipe, im, PROMPTS[i % 2], MAX_NEW) for i, im in enumerate(images())]
    floor, pipe.strategy.tree_floor = pipe.strategy.tree_floor, 0.0
    try:
        one = pipe.generate(images()[0], PROMPTS[0], max_new_tokens=MAX_NEW, tree_nodes=12, num_draft_tokens=5)
        assert one.token_ids == expected[0] and any(len(set(r.parents or ())) < len(r.draft_ids) for r in one.rounds)
        batched = pipe.generate_batch(images(), [PROMPTS[i % 2] for i in range(3)], batch_size=2,
                                      max_new_tokens=MAX_NEW, tree_nodes=12, num_draft_tokens=5)
        assert [r.token_ids for r in batched] == expected
    finally:
        pipe.strategy.tree_floor = floor


def test_nothing_skipped_is_the_target_drafting_for_itself(family):
    """With an empty skip set the drafter is the target: every draft passes but those it may never propose (the
    padding rows, image placeholders), so its prompt, image features, positions and cache are the target's."""
    _, base = family
    pipe = base.with_drafter_kind("layerskip", drafter=[])
    pipe.strategy.start_threshold = 0.0
    bad = set(torch.nonzero(pipe.strategy.bad_ids).flatten().tolist())
    for image, prompt in zip(images()[1:2], PROMPTS[1:]):
        res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
        assert res.token_ids == hf_greedy(base, image, prompt, MAX_NEW)
        drafted = 0
        for r in res.rounds:
            drafted += len(r.draft_ids)
            if r.target_token is not None and r.n_accepted < len(r.draft_ids):
                assert r.target_token in bad, res.rounds
        assert drafted and res.stats.mean_accepted > 1.5 or res.stats.stop_reason == "eos"
        tree = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, tree_nodes=8, num_draft_tokens=3)
        assert tree.token_ids == res.token_ids


def test_image_is_encoded_once(family):
    _, pipe = family
    pipe.vision_cache.clear()
    with mock.patch.object(pipe.adapter, "encode_image", wraps=pipe.adapter.encode_image) as encode:
        res = pipe.generate(images()[2], PROMPTS[1], max_new_tokens=6, num_draft_tokens=2)
    assert encode.call_count == 1 and not res.stats.vision_cache_hit


# ----- sampling ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("ls-llava") / "target", layers=LAYERS)


def test_sampling_follows_the_target(llava):
    """Batched rows with their own generators: the first two tokens follow the target's distribution, and a
    row's sample is the one it gets alone (seeded rows draft without the adaptive stop)."""
    pipe = mmspec.load(str(llava), drafter=None, drafter_kind="layerskip")
    image, prompt, temperature, top_p = sample_image(3), "describe the image .", 1.0, 0.95
    p1, p2 = _first_two_token_distributions(pipe, image, prompt, temperature, top_p)
    results = pipe.generate_batch([image] * 240, prompt, batch_size=12, max_new_tokens=2, temperature=temperature,
                                  top_p=top_p, num_draft_tokens=3, seed=2000)
    rows = [r.token_ids for r in results]
    assert _chi2_p(np.bincount([ids[0] for ids in rows], minlength=len(p1)), p1) > P_MIN
    assert _chi2_p(np.bincount([t for ids in rows for t in ids[1:]], minlength=len(p2)), p2) > P_MIN
    assert sum(r.stats.drafted_tokens for r in results) > 0
    for i in (3, 239):
        alone = pipe.generate(image, prompt, max_new_tokens=2, temperature=temperature, top_p=top_p,
                              num_draft_tokens=3, seed=2000 + i)
        assert alone.token_ids == rows[i]


# ----- the adaptive stop -------------------------------------------------------------------------------------
def test_adaptive_stop_follows_acceptance():
    stop = AdaptiveStop(0.5)
    for _ in range(20):
        stop.observe(0, 4)           # nothing passes: drafts should stop sooner
    high = stop.value
    assert high > 0.8
    for _ in range(40):
        stop.observe(4, 4)           # everything passes: drafts may run longer
    assert stop.value < 0.2 and stop.value >= stop.lo
    stop.observe(0, 0)               # a round without drafts changes nothing
    assert stop.value < 0.2


def test_confidence_stop_shortens_chains(llava):
    """A threshold above every probability the drafter gives ends each chain at its first token (greedy rows);
    the output is the same."""
    pipe = mmspec.load(str(llava), drafter=None, drafter_kind="layerskip")
    pipe.strategy.start_threshold = 0.95
    with mock.patch.object(AdaptiveStop, "observe", lambda self, a, d: None):   # held at 0.95
        res = pipe.generate(images()[0], PROMPTS[1], max_new_tokens=MAX_NEW, num_draft_tokens=4)
    assert res.token_ids == hf_greedy(pipe, images()[0], PROMPTS[1], MAX_NEW)
    assert max(len(r.draft_ids) for r in res.rounds) <= 1


# ----- skip sets: the search, files, refusals ----------------------------------------------------------------
IDENTITY = [2, 3]   # (the untuned default of 5 layers is [1, 3])


@pytest.fixture(scope="module")
def identity_target(tmp_path_factory):
    """A 5-layer LLaVA whose layers 2 and 3 are identity maps (zero attention output and MLP down projections:
    each adds nothing to the residual stream), so skipping them drafts exactly what the target says."""
    from transformers import LlavaForConditionalGeneration

    folder = build_tiny_llava(tmp_path_factory.mktemp("ls-identity") / "target", layers=5, seed=4)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        for i in IDENTITY:
            layer = model.model.language_model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    return folder


def test_tune_command_finds_the_identity_layers(identity_target, tmp_path):
    from mmspec.cli import main

    data = tmp_path / "data.jsonl"
    lines = []
    for i in range(3):
        sample_image(10 + i, 40).save(tmp_path / f"im{i}.png")
        lines.append(json.dumps({"image": f"im{i}.png", "prompt": PROMPTS[i % 2]}))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "skip.json"
    assert main(["tune-layerskip", "--target", str(identity_target), "--data", str(data), "--out", str(out),
                 "--n", "3", "--max-new-tokens", "10", "--num-draft-tokens", "4"]) == 0
    settings = json.loads(out.read_text())
    assert settings["skip"] == IDENTITY and settings["target"]["num_hidden_layers"] == 5
    tuning = settings["tuning"]
    # skipping identity layers drafts what the full stack drafts, with 3 of 5 layers: a better score
    searched, full = tuning["search_score"], tuning["search_full_stack"]
    assert searched["acceptance"] == full["acceptance"] and searched["kept_fraction"] == 0.6
    assert tuning["engine"]["tuned"]["score"] > tuning["engine"]["full_stack"]["score"]
    assert tuning["engine"]["untuned_default"]["skip"] == [1, 3] != IDENTITY
    pipe = mmspec.load(str(identity_target), drafter=str(out))   # the file names its kind
    assert pipe.drafter_kind == "layerskip"
    assert pipe.strategy.skip == IDENTITY and pipe.strategy.source == str(out)
    with pytest.raises(MMSpecError, match="skip-set file, not a 'text' drafter"):
        mmspec.load(str(identity_target), drafter=str(out), drafter_kind="text")
    res = pipe.generate(sample_image(10, 40), PROMPTS[0], max_new_tokens=MAX_NEW, num_draft_tokens=4)
    assert res.token_ids == hf_greedy(pipe, sample_image(10, 40), PROMPTS[0], MAX_NEW)
    bad = set(torch.nonzero(pipe.strategy.bad_ids).flatten().tolist())
    for r in res.rounds:   # the skipped layers add nothing: a draft fails only where the drafter may not go
        if r.target_token is not None and r.n_accepted < len(r.draft_ids):
            assert r.target_token in bad, res.rounds
    # a file that is not a skip set is not overwritten
    other = tmp_path / "notes.json"
    other.write_text('{"mine": true}\n')
    assert main(["tune-layerskip", "--target", str(identity_target), "--data", str(data), "--out", str(other)]) == 2
    assert other.read_text() == '{"mine": true}\n'


def test_skip_sets_that_do_not_fit_are_refused(identity_target, llava, tmp_path):
    base = mmspec.load(str(llava), drafter=None, drafter_kind="none")
    with pytest.raises(MMSpecError, match=r"out of range.*4 decoder layers"):
        base.with_drafter_kind("layerskip", drafter=[1, 7])
    with pytest.raises(MMSpecError, match="every layer"):
        base.with_drafter_kind("layerskip", drafter=[0, 1, 2, 3])
    with pytest.raises(MMSpecError, match="list of layer ids"):
        base.with_drafter_kind("layerskip", drafter=[1.5])
    with pytest.raises(MMSpecError, match="is not a file"):
        base.with_drafter_kind("layerskip", drafter=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MMSpecError, match="not a layerskip skip-set file"):
        base.with_drafter_kind("layerskip", drafter=str(tmp_path / "bad.json"))
    # a file tuned for another target: another shape, or the same shape with other weights
    other = mmspec.load(str(identity_target), drafter=None, drafter_kind="none")
    write_skip_file(tmp_path / "other.json", other.target, [1])
    with pytest.raises(MMSpecError, match="another target.*num_hidden_layers 5 vs the target's 4"):
        mmspec.load(str(llava), drafter=str(tmp_path / "other.json"), drafter_kind="layerskip")
    settings = write_skip_file(tmp_path / "mine.json", base.target, [2])
    settings["target"]["fingerprint"][0] *= 1.5
    (tmp_path / "changed.json").write_text(json.dumps(settings))
    with pytest.raises(MMSpecError, match="fingerprint"):
        base.with_drafter_kind("layerskip", drafter=str(tmp_path / "changed.json"))
    settings["target"]["fingerprint"][0] /= 1.5
    settings["skip"] = [9]
    (tmp_path / "range.json").write_text(json.dumps(settings))
    with pytest.raises(MMSpecError, match="out of range"):
        base.with_drafter_kind("layerskip", drafter=str(tmp_path / "range.json"))
    assert base.with_drafter_kind("layerskip", drafter=str(tmp_path / "mine.json")).strategy.skip == [2]
    assert base.with_drafter_kind("layerskip", drafter="untuned").strategy.skip == [1]


def test_layers_that_cannot_be_skipped_are_refused(llava):
    pipe = mmspec.load(str(llava), drafter=None, drafter_kind="none")
    text = pipe.target.config.get_text_config()
    with mock.patch.object(text, "layer_types", ["full_attention", "linear_attention"] * 2, create=True):
        with pytest.raises(MMSpecError, match="full-attention layers only.*linear_attention"):
            LayerSkipDrafter(pipe.adapter)


def test_bundled_target_uses_its_shipped_skip_set():
    if not BUNDLED_SKIP_SET.is_file():
        pytest.fail(f"{BUNDLED_SKIP_SET} is missing: `mmspec tune-layerskip --out {BUNDLED_SKIP_SET}` makes it")
    pipe = mmspec.load(drafter_kind="layerskip")
    shipped = json.loads(BUNDLED_SKIP_SET.read_text())
    assert pipe.strategy.source == str(BUNDLED_SKIP_SET) and pipe.strategy.skip == shipped["skip"]
    base = pipe.with_drafter_kind("none")
    from vision.scenes import HELDOUT_SEEDS, examples_for_scene

    ex = examples_for_scene(list(HELDOUT_SEEDS)[1], kinds=("caption",))[0]
    res = pipe.generate(ex.image, ex.prompt, max_new_tokens=24, num_draft_tokens=4)
    assert res.token_ids == base.generate(ex.image, ex.prompt, max_new_tokens=24).token_ids
