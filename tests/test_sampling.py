"""Sampling is lossless: emitted tokens follow the target's distribution whatever the drafter proposes.

Statistical bound: each check is a chi-square goodness-of-fit test against the exact target distribution;
we require p-value > 1e-4 (a correct sampler fails such a check once in 10,000 runs; the generators are
seeded, so the outcome is deterministic). A sampler that ignores the target (emits q) or forgets the
residual max(0, p - q) fails these checks by a wide margin: ``test_chi_square_detects_a_wrong_sampler``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import mmspec
from mmspec.acceptance import accept_sampling, warp_logits
from mmspec.targets.batch import TargetSession
from tests.tiny import sample_image
from vision.images import load_image

P_MIN = 1e-4


def _chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    probs = np.asarray(probs, dtype=np.float64) / np.sum(probs, dtype=np.float64)
    keep = probs * counts.sum() >= 5  # merge sparse cells so the chi-square approximation holds
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep], probs[~keep].sum()) * counts.sum()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp / exp.sum() * obs.sum()
    return float(chisquare(obs, exp).pvalue)


def _hand_made(seed=0, vocab=6, k=3):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, -1)
    return p, q


def _run_rule(p, q, n, seed=0, wrong=False):
    """Emitted (first, second) tokens of n rounds of speculative sampling with a context-free target."""
    g = torch.Generator().manual_seed(seed)
    firsts, seconds = [], []
    for _ in range(n):
        draft = torch.multinomial(q, 1, generator=g)[:, 0]
        if wrong:  # a broken rule: accept every draft
            n_acc, token = len(draft), int(torch.multinomial(p[-1], 1, generator=g))
        else:
            n_acc, token = accept_sampling(draft, q, p, g)
        emitted = draft[:n_acc].tolist() + [token]
        firsts.append(emitted[0])
        if len(emitted) > 1:
            seconds.append(emitted[1])
    return np.bincount(firsts, minlength=p.shape[1]), np.bincount(seconds, minlength=p.shape[1])


def test_rejection_rule_on_hand_made_p_and_q():
    p, q = _hand_made()
    first, second = _run_rule(p, q, 20000)
    # The first emitted token ~ p[0]; given a first draft was accepted, the second ~ p[1] (context-free target).
    assert _chi2_p(first, p[0].numpy()) > P_MIN
    assert _chi2_p(second, p[1].numpy()) > P_MIN


def test_chi_square_detects_a_wrong_sampler():
    p, q = _hand_made()
    first, _ = _run_rule(p, q, 20000, wrong=True)
    assert _chi2_p(first, p[0].numpy()) < 1e-10


def test_rule_edge_cases():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    # A draft the target gives probability 0 is always rejected; the recovered token comes from max(0, p - q).
    for seed in range(20):
        n, tok = accept_sampling(torch.tensor([0]), q, p, torch.Generator().manual_seed(seed))
        assert (n, tok) == (0, 1)
    # A draft equal to a one-hot target is always accepted, then a bonus token is drawn from p[1].
    n, tok = accept_sampling(torch.tensor([1]), torch.tensor([[0.0, 1.0, 0.0]]), p, torch.Generator())
    assert n == 1 and tok in (0, 1, 2)


def test_warp_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t, top_p in [(0.7, 1.0), (1.0, 0.9), (1.3, 0.5)]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        assert torch.allclose(warp_logits(logits, t, top_p), ref.softmax(-1), atol=1e-6)


def _first_two_token_distributions(pipe, image, prompt, temperature, top_p):
    """Exact target distributions: p(t1), and p(t2) given that t1 is not end-of-sequence."""
    req = pipe.adapter.prepare(load_image(image), pipe.adapter.format_prompt(prompt))
    pipe.adapter.image_features(req)
    eos = pipe.adapter.eos_token_ids
    with torch.inference_mode():
        sess = TargetSession(pipe.adapter, req)
        base = sess.length
        p1 = warp_logits(sess.forward(torch.tensor([req.prompt_ids[-1]]))[-1], temperature, top_p)
        p2 = torch.zeros_like(p1)
        for t1 in torch.nonzero(p1).flatten().tolist():
            if t1 not in eos:
                sess.rollback(base + 1)
                p2 += p1[t1] * warp_logits(sess.forward(torch.tensor([t1]))[-1], temperature, top_p)
    return p1.numpy(), (p2 / p2.sum()).numpy()


@pytest.mark.parametrize("kind", ["text", "ngram"])
def test_end_to_end_first_tokens_follow_the_target(tiny_target, tiny_drafter, kind):
    pipe = mmspec.load(str(tiny_target), drafter=str(tiny_drafter) if kind == "text" else None, drafter_kind=kind)
    image, prompt, temperature, top_p = sample_image(3), "describe the image .", 1.0, 0.95
    p1, p2 = _first_two_token_distributions(pipe, image, prompt, temperature, top_p)
    firsts, seconds = [], []
    for seed in range(1000):
        ids = pipe.generate(image, prompt, max_new_tokens=2, temperature=temperature, top_p=top_p,
                            num_draft_tokens=3, seed=seed).token_ids
        firsts.append(ids[0])
        seconds.extend(ids[1:])
    assert _chi2_p(np.bincount(firsts, minlength=len(p1)), p1) > P_MIN
    assert _chi2_p(np.bincount(seconds, minlength=len(p2)), p2) > P_MIN


def test_same_seed_same_sample(tiny_target, tiny_drafter):
    pipe = mmspec.load(str(tiny_target), drafter=str(tiny_drafter))
    a = pipe.generate(sample_image(0), "describe the image .", max_new_tokens=12, temperature=0.8, seed=7)
    b = pipe.generate(sample_image(0), "describe the image .", max_new_tokens=12, temperature=0.8, seed=7)
    assert a.token_ids == b.token_ids


def test_batched_sampling_follows_the_target_per_row(tiny_target, tiny_drafter):
    """Rows of one batch, each with its own generator (seed + row): the first two tokens of every row follow the
    target's distribution, and a row's sample is the one it gets alone (fixed k), whatever its batch mates."""
    pipe = mmspec.load(str(tiny_target), drafter=str(tiny_drafter))
    image, other, prompt, temperature, top_p = sample_image(3), sample_image(5), "describe the image .", 1.0, 0.95
    p1, p2 = _first_two_token_distributions(pipe, image, prompt, temperature, top_p)
    n = 600
    images = [image if i % 3 else other for i in range(n)]  # batch mates with another image in between
    results = pipe.generate_batch(images, prompt, batch_size=8, max_new_tokens=2, temperature=temperature,
                                  top_p=top_p, num_draft_tokens=3, seed=1000)
    rows = [r.token_ids for i, r in enumerate(results) if i % 3]
    firsts = [ids[0] for ids in rows]
    seconds = [t for ids in rows for t in ids[1:]]
    assert _chi2_p(np.bincount(firsts, minlength=len(p1)), p1) > P_MIN
    assert _chi2_p(np.bincount(seconds, minlength=len(p2)), p2) > P_MIN
    for i in (1, 2, 4, 599):
        alone = pipe.generate(images[i], prompt, max_new_tokens=2, temperature=temperature, top_p=top_p,
                              num_draft_tokens=3, seed=1000 + i)
        assert alone.token_ids == results[i].token_ids
