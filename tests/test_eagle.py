"""The eagle drafter with mmspec's first head format (``eagle_config.json``: a head over the target's last hidden
state, the bundled default): it keeps loading and stays lossless (batch 1 and batched), the hidden states the
engine hands the head equal a fresh forward's, save/load round trip, a head for another target is refused, the
training-time-test mask, the draft-length policy's prior. EAGLE-3 heads (what `train-drafter --kind eagle` writes
now, with its training, resume and sampling tests) are in tests/test_eagle3.py. Every other family runs the eagle
kind through tests/tiny_families.py (KINDS).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mmspec
from mmspec.drafters.eagle import EagleDrafter, EagleHead, head_config_for
from mmspec.pipeline import Pipeline
from tests.tiny import sample_image
from tests.tiny_families import random_eagle_head

PROMPTS = ["what color is the circle ?", "describe the image ."]
MAX_NEW = 20


def hf_greedy(pipe, image, prompt, max_new_tokens=MAX_NEW):
    inputs = pipe.processor(images=image, text=pipe.adapter.format_prompt(prompt), return_tensors="pt")
    out = pipe.target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def base(tiny_target):
    return mmspec.load(str(tiny_target), drafter=None, drafter_kind="none")


def test_ttt_mask_sees_the_true_prefix_and_its_own_chain():
    from mmspec.training import ttt_mask

    m = ttt_mask(4, 2)             # copies 0, 1, 2 of positions 0..3
    q = lambda s, p: s * 4 + p     # noqa: E731
    assert m[q(0, 2)].nonzero().flatten().tolist() == [0, 1, 2]                    # plain causal
    # copy 1 at position 3 was drafted from base 2: true 0..2, then itself
    assert m[q(1, 3)].nonzero().flatten().tolist() == [0, 1, 2, q(1, 3)]
    # copy 2 at position 3 (base 1): true 0..1, copy 1 at 2, itself
    assert m[q(2, 3)].nonzero().flatten().tolist() == [0, 1, q(1, 2), q(2, 3)]
    assert not m[q(2, 1)].any()    # no base: never used in the loss


@pytest.mark.parametrize("k", [None, 2, 4])
def test_random_head_is_lossless(base, tiny_target, tmp_path, k):
    pipe = mmspec.load(str(tiny_target), drafter=str(random_eagle_head(tiny_target, tmp_path / "h")),
                       drafter_kind="eagle")
    for seed in range(3):
        image, prompt = sample_image(seed), PROMPTS[seed % 2]
        res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=k)
        assert res.token_ids == hf_greedy(base, image, prompt)


def test_the_head_reads_the_targets_true_hidden_states(base, tiny_target, tmp_path):
    """What the engine hands the head after each round is the target's last hidden state at every committed
    position: equal to one fresh forward over prompt + output."""
    head = EagleHead.from_pretrained(random_eagle_head(tiny_target, tmp_path / "h"))
    got = []

    class Recording(EagleDrafter):
        def batch(self):
            b = super().batch()
            update = b.update

            def record(results, hidden=None):
                got.append(hidden[0].clone())
                update(results, hidden)

            b.update = record
            return b

    pipe = Pipeline(base.adapter, Recording(base.adapter, head))
    image, prompt = sample_image(2), PROMPTS[1]
    res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
    req = base.adapter.prepare(image, base.adapter.format_prompt(prompt))
    base.adapter.image_features(req)
    with torch.inference_mode():
        embeds = torch.cat([base.adapter.prompt_embeds(req),
                            base.target.get_input_embeddings()(torch.tensor([res.token_ids[:-1]]))], dim=1)
        ref = base.target.get_decoder()(inputs_embeds=embeds).last_hidden_state[0]
    seen = torch.cat(got)
    assert seen.shape[0] == ref.shape[0] == len(req.prompt_ids) + len(res.token_ids) - 1
    assert torch.allclose(seen, ref, atol=1e-4)


def test_a_recorded_acceptance_is_the_policys_prior(base, tmp_path):
    from mmspec.drafters.eagle import record_acceptance

    torch.manual_seed(0)
    EagleHead(head_config_for(base.adapter)).save_pretrained(tmp_path / "h")
    fresh = Pipeline(base.adapter, EagleDrafter.from_pretrained(base.adapter, tmp_path / "h", torch.float32))
    assert fresh.strategy.prior_acceptance == fresh.policy.prior == 0.6
    record_acceptance(tmp_path / "h", 0.8123)
    again = Pipeline(base.adapter, EagleDrafter.from_pretrained(base.adapter, tmp_path / "h", torch.float32))
    assert again.strategy.prior_acceptance == again.policy.prior == 0.812


def test_the_bundled_head_starts_from_its_measured_acceptance(monkeypatch):
    """A head's recorded acceptance sets the policy's prior: the bundled one (92 % on held-out prompts) drafts
    long from a request's first drafting round, where a generic prior (0.6) drafted 4-5 tokens."""
    from mmspec.engine import Job
    from mmspec.policy import DraftPolicy

    pipe = mmspec.load()
    assert pipe.strategy.prior_acceptance == pytest.approx(0.921)
    job = Job(request=None, config=pipe.decode_config({}))
    for prior, shortest in ((0.921, 8), (0.6, 0)):
        monkeypatch.setattr(pipe.strategy, "prior_acceptance", prior)
        policy = DraftPolicy(pipe.strategy)
        job.accepted_run, job.rejected_run = policy.row_prior()
        k = policy.choose([job])
        assert k >= shortest and (prior > 0.9 or k < 8), (prior, k)


def test_a_rounds_fixed_drafting_cost_is_charged_once():
    """The cost model fits drafting as c + d * k: when most of a round's drafting cost is fixed (feeding what
    the last round accepted), a sure row drafts the longest draft; when every step is dear, it drafts short."""
    from mmspec.engine import Job
    from mmspec.policy import CostModel, DraftPolicy, LinearFit

    fit = LinearFit(((1, 5.0), (3, 9.0)))              # y = 3 + 2 x
    assert fit(10) == pytest.approx(23.0)
    for _ in range(300):                               # observations take over from the prior
        fit.observe(2, 1.5)
        fit.observe(6, 3.5)                            # y = 0.5 + 0.5 x
    assert fit(4) == pytest.approx(2.5, rel=1e-3)

    pipe = mmspec.load()
    job = Job(request=None, config=pipe.decode_config({}))
    job.accepted_run, job.rejected_run = 9.5, 0.5      # 95 % per token

    def chosen(fixed_s, per_step_s):
        policy = DraftPolicy(pipe.strategy)
        policy.costs = CostModel()
        for _ in range(300):
            policy.costs.verify.observe(1, 0.008)
            policy.costs.verify.observe(17, 0.014)
            policy.costs.observe_draft(1, fixed_s + per_step_s)
            policy.costs.observe_draft(16, fixed_s + 16 * per_step_s)
        assert policy.costs.draft_s(0) == 0.0 and policy.costs.draft_s(8) == pytest.approx(fixed_s + 8 * per_step_s,
                                                                                           rel=1e-2)
        return policy.choose([job])

    assert chosen(0.004, 0.0003) == 16
    assert chosen(0.0, 0.004) < 8


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_the_heads_forward_is_its_decoder_layers(base, kv_heads):
    """EagleHead.forward spells out LlamaDecoderLayer (sdpa) without its plumbing: same numbers, with a cache, a
    4-D mask, no mask, and grouped key/value heads; so does a head frozen for drafting (fused projections)."""
    from transformers import DynamicCache

    from mmspec.kv import CACHE_KW, SlotCache
    from mmspec.trees import chain

    torch.manual_seed(0)
    cfg = head_config_for(base.adapter)
    if kv_heads:
        cfg["num_key_value_heads"] = kv_heads
    head = EagleHead(cfg).eval()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    H = cfg["hidden_size"]
    frozen = copy.deepcopy(head).freeze_for_drafting()

    def reference(hidden, inputs, mask, positions, cache):
        x = head.fc(torch.cat([inputs, hidden], dim=-1))
        out = head.layer(x, attention_mask=mask, position_ids=positions, position_embeddings=head.rotary(x, positions),
                         use_cache=True, **{CACHE_KW: cache})
        return out[0] if isinstance(out, tuple) else out

    with torch.inference_mode():
        slots = {name: SlotCache(head.layer_cfg, "cpu", torch.float32) for name in ("lean", "fused", "hf")}
        caches = {name: DynamicCache(config=head.layer_cfg) for name in slots}
        for name, s in slots.items():
            s.cache = caches[name]
            s.add_empty(0)
        for T in (5, 3, 1):   # a prefill, a block of three, one token on a dense cache (mask None)
            hidden, inputs = torch.randn(1, T, H), torch.randn(1, T, H)
            outs = {}
            for name, fn in (("lean", head.forward), ("fused", frozen.forward), ("hf", reference)):
                mask, pos = slots[name].extend([chain(T)])
                if T == 1 and name != "hf":
                    mask = None
                outs[name] = fn(hidden, inputs, mask, pos, caches[name])
                slots[name].commit([list(range(T))])
            torch.testing.assert_close(outs["lean"], outs["hf"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs["fused"], outs["hf"], rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(base, tmp_path):
    torch.manual_seed(0)
    head = EagleHead(head_config_for(base.adapter))
    head.save_pretrained(tmp_path / "h")
    again = EagleHead.from_pretrained(tmp_path / "h")
    assert again.cfg == head.cfg
    for k, v in head.state_dict().items():
        if not k.startswith("rotary."):
            assert torch.equal(v, again.state_dict()[k])
    assert (tmp_path / "h" / "model.safetensors").is_file()


def test_a_head_for_another_target_is_refused(base, tiny_target, tmp_path):
    cfg = head_config_for(base.adapter)
    for change, message in [({"hidden_size": cfg["hidden_size"] * 2, "intermediate_size": 8}, "hidden size"),
                            ({"vocab_size": cfg["vocab_size"] + 3}, "vocabulary"),
                            ({"family": "qwen2_vl"}, "family")]:
        EagleHead({**cfg, **change}).save_pretrained(tmp_path / message)
        with pytest.raises(mmspec.MMSpecError, match=f"trained for another target.*{message}"):
            mmspec.load(str(tiny_target), drafter=str(tmp_path / message), drafter_kind="eagle")
    with pytest.raises(mmspec.MMSpecError, match="not an eagle drafter"):
        mmspec.load(str(tiny_target), drafter=str(tmp_path), drafter_kind="eagle")


def test_vocab_trim_and_confidence_stop_stay_lossless(base, tiny_target, tmp_path):
    folder = random_eagle_head(tiny_target, tmp_path / "h")
    cfg = json.loads((folder / "eagle_config.json").read_text())
    head = EagleHead.from_pretrained(folder)
    # draft only over the tokens of the first few answers, and stop a row's draft below 0.5 confidence
    answers = {t for s in range(3) for t in hf_greedy(base, sample_image(s), PROMPTS[s % 2])}
    head.cfg = {**cfg, "draft_vocab": sorted(answers), "stop_threshold": 0.5}
    pipe = Pipeline(base.adapter, EagleDrafter(base.adapter, head))
    for seed in range(5):
        image, prompt = sample_image(seed), PROMPTS[seed % 2]
        res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=4)
        assert res.token_ids == hf_greedy(base, image, prompt)
        assert all(t in answers for r in res.rounds for t in r.draft_ids)
