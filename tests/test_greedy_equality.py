"""Greedy output of every drafter kind equals the target's own ``generate(do_sample=False)``, token for token.

Drafters: the real kinds (text, ngram, none) plus three scripted ones (always right, never right, right for
exactly j tokens), with an image in the input, a padded-vocabulary target, ``max_new_tokens`` above 2(k+1),
and an end-of-sequence token inside a draft block.
"""

from __future__ import annotations

import pytest
import torch

import mmspec
from mmspec.drafters.base import Draft, Drafter, DraftSession
from mmspec.pipeline import Pipeline
from mmspec.targets.batch import TargetSession
from tests.tiny import sample_image

PROMPTS = ["what color is the circle ?", "describe the image ."]
MAX_NEW = 24  # > 2 (k + 1) for every k used here


def hf_greedy(pipe, image, prompt, max_new_tokens=MAX_NEW, eos=None):
    text = pipe.adapter.format_prompt(prompt)
    inputs = pipe.processor(images=image, text=text, return_tensors="pt")
    kwargs = {} if eos is None else {"eos_token_id": eos}
    out = pipe.target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


class ScriptedSession(DraftSession):
    """Proposes the reference continuation, right for the first ``right`` tokens of each block, then wrong."""

    def __init__(self, reference, right, vocab, device):
        self.reference, self.right, self.vocab, self.device = reference, right, vocab, device
        self.n = 0
        self.forwards = 0

    def propose(self, k):
        ids = []
        for i in range(k):
            true = self.reference[self.n + i] if self.n + i < len(self.reference) else 5
            ids.append(true if i < self.right else (true + 1 + i) % self.vocab)
        return Draft(torch.tensor(ids, dtype=torch.long, device=self.device))

    def update(self, n_accepted, emitted):
        self.n += len(emitted)


class ScriptedDrafter(Drafter):
    kind = "scripted"

    def __init__(self, target, reference, right, k):
        super().__init__(target)
        self.reference, self.right, self.default_k = reference, right, k

    def session(self, request, config, generator):
        return ScriptedSession(self.reference, self.right, len(self.target.tokenizer), self.target.device)


@pytest.fixture(scope="module")
def pipes(tiny_target, tiny_drafter):
    return {kind: mmspec.load(str(tiny_target), drafter=str(tiny_drafter) if kind == "text" else None,
                              drafter_kind=kind) for kind in ("text", "ngram", "none")}


def test_target_vocabulary_is_padded(pipes):
    pipe = pipes["text"]
    assert pipe.target.get_output_embeddings().weight.shape[0] > len(pipe.processor.tokenizer)
    assert pipe.drafter.get_output_embeddings().weight.shape[0] < pipe.adapter.vocab_size


@pytest.mark.parametrize("kind", ["text", "ngram", "none"])
@pytest.mark.parametrize("k", [None, 1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_kind_matches_hf_greedy(pipes, kind, k, seed):
    pipe = pipes[kind]
    image = sample_image(seed)
    prompt = PROMPTS[seed % 2]
    expected = hf_greedy(pipe, image, prompt)
    res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=k)
    assert res.token_ids == expected
    assert res.text == pipe.processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert sum(len(r.emitted) for r in res.rounds) == len(res.token_ids)
    assert res.stats.target_forwards == len(res.rounds)


@pytest.mark.parametrize("right", ["always", "never", 1, 2, 3])
@pytest.mark.parametrize("k", [1, 4, 6])
def test_scripted_drafters_match_hf_greedy(pipes, right, k):
    base = pipes["none"]
    image = sample_image(1)
    prompt = PROMPTS[1]
    expected = hf_greedy(base, image, prompt)
    n_right = {"always": k, "never": 0}.get(right, right)
    pipe = Pipeline(base.adapter, ScriptedDrafter(base.adapter, expected, n_right, k))
    res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=k)
    assert res.token_ids == expected
    full_rounds = [r for r in res.rounds if r.target_token is not None and len(r.draft_ids) == k]
    assert full_rounds, "some rounds draft the full k tokens"
    for r in full_rounds[:-1]:
        assert r.n_accepted == min(n_right, k)
    if right == "always":
        assert res.stats.target_forwards <= -(-MAX_NEW // (k + 1)) + 1


@pytest.mark.parametrize("kind", ["text", "none"])
def test_the_prefill_verifies_the_first_drafts(pipes, kind):
    """One target call per round: the prefill runs in round 1's verify forward (prompt + drafts at once), so a
    request costs no target forward beyond ``stats.target_forwards``."""
    pipe = pipes[kind]
    image, prompt = sample_image(4), PROMPTS[1]
    expected = hf_greedy(pipe, image, prompt)
    calls = []
    hook = pipe.target.get_decoder().register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
    finally:
        hook.remove()
    assert res.token_ids == expected
    assert len(calls) == res.stats.target_forwards == len(res.rounds)
    if kind == "none":
        assert len(calls) == len(expected)
    else:
        assert len(res.rounds[0].draft_ids) == 3


def test_session_rollback_before_the_first_forward(pipes):
    """Before the first forward the prompt's last position is pending: rolling back to the reported length is a
    no-op, rolling back further runs the kept prompt positions, and the logits equal a fresh session's."""
    adapter = pipes["none"].adapter
    req = adapter.prepare(sample_image(2), adapter.format_prompt(PROMPTS[1]))
    adapter.image_features(req)
    ids = torch.tensor([req.prompt_ids[-1], 5, 6])
    with torch.inference_mode():
        ref = TargetSession(adapter, req).forward(ids)
        sess = TargetSession(adapter, req)
        assert sess.length == len(req.prompt_ids) - 1
        sess.rollback(sess.length)
        got = sess.forward(ids)
        assert sess.length == len(req.prompt_ids) + 2
        shorter = TargetSession(adapter, req)
        shorter.rollback(len(req.prompt_ids) - 2)             # drop one more prompt position, then feed it again
        again = shorter.forward(torch.tensor(req.prompt_ids[-2:] + [5, 6]))[1:]
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(again, ref, atol=1e-4)


def _eos_case(pipes):
    """A prompt/image whose greedy output, cut by a chosen extra end-of-sequence id, ends a few tokens in."""
    base = pipes["none"]
    for seed in range(8):
        for prompt in PROMPTS:
            image = sample_image(seed)
            free = hf_greedy(base, image, prompt)
            new = [t for i, t in enumerate(free[:-1]) if i >= 4 and t not in free[:i]]
            if new:
                return base, image, prompt, new[0], free
    raise AssertionError("no tiny-model output long enough to place an end-of-sequence token in")


@pytest.mark.parametrize("k", [3, 8])
def test_end_of_sequence_inside_a_draft_block(pipes, k):
    base, image, prompt, eos_id, free = _eos_case(pipes)
    configs = [p.target.generation_config for p in pipes.values()]
    old = base.target.generation_config.eos_token_id
    for cfg in configs:
        cfg.eos_token_id = [old, eos_id]
    try:
        expected = hf_greedy(base, image, prompt)
        assert expected[-1] == eos_id and len(expected) < MAX_NEW
        # The always-right drafter proposes past the end of sequence; the output must still stop there.
        pipe = Pipeline(base.adapter, ScriptedDrafter(base.adapter, free, k, k))
        res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, num_draft_tokens=k)
        assert res.token_ids == expected
        assert res.stats.stop_reason == "eos"
        assert res.rounds[-1].target_token is None or res.rounds[-1].target_token == eos_id
        for kind in ("text", "ngram"):
            assert pipes[kind].generate(image, prompt, max_new_tokens=MAX_NEW).token_ids == expected
    finally:
        for cfg in configs:
            cfg.eos_token_id = old


def test_max_new_tokens_is_exact(pipes):
    image = sample_image(2)
    for n in (1, 2, 7):
        res = pipes["text"].generate(image, PROMPTS[1], max_new_tokens=n, num_draft_tokens=4)
        expected = hf_greedy(pipes["none"], image, PROMPTS[1], max_new_tokens=n)
        assert res.token_ids == expected
        assert len(res.token_ids) <= n


def test_stream_yields_one_event_per_round(pipes):
    pipe = pipes["text"]
    image = sample_image(0)
    events = list(pipe.stream(image, PROMPTS[0], max_new_tokens=MAX_NEW))
    assert [e.done for e in events] == [False] * (len(events) - 1) + [True]
    final = events[-1].result
    assert final is not None and [e.round for e in events] == final.rounds
    assert events[-1].token_ids == final.token_ids == pipe.generate(image, PROMPTS[0], max_new_tokens=MAX_NEW).token_ids


def test_lean_drafter_forward_matches_the_full_forward(pipes):
    """The drafter's lean forward (speed only) gives the logits of its model's own forward, one token at a time
    over a slot cache with a hole (a rejected draft) in it."""
    from mmspec.drafters.text import lean_forward
    from mmspec.kv import SlotCache
    from mmspec.trees import chain

    strategy = pipes["text"].strategy
    assert strategy.lean_step
    model = strategy.model
    ids = torch.tensor([4, 9, 17, 22, 8, 30, 11])
    with torch.inference_mode():
        ref = model(input_ids=ids[None]).logits[0]
        slots = SlotCache(model.config, "cpu", model.dtype)
        slots.add_empty(0)
        mask, pos = slots.extend([chain(4)])
        lean_forward(model, model.model.embed_tokens(torch.tensor([[4, 9, 17, 5]])), mask, pos, slots.cache)
        slots.commit([[0, 1, 2]])                                  # the 4th token was a rejected draft
        for i in range(3, len(ids)):
            mask, pos = slots.extend([chain(1)])
            hidden = lean_forward(model, model.model.embed_tokens(ids[None, i:i + 1]), mask, pos, slots.cache)
            slots.commit([[0]])
            assert torch.allclose(model.lm_head(hidden)[0, -1], ref[i], atol=1e-4)


@pytest.mark.parametrize("kind, settings", [("text", {}), ("ngram", {}), ("none", {}),
                                            ("text", dict(tree_nodes=8, num_draft_tokens=4))])
def test_repetition_penalty_from_generation_config(pipes, kind, settings):
    """Targets like Qwen2.5-VL ship repetition_penalty in generation_config; greedy generate() applies it. In a
    tree each node is scored with the tokens of its own path only, so trees still equal generate()."""
    pipe = pipes[kind]
    cfg = pipe.target.generation_config
    plain = [hf_greedy(pipe, sample_image(seed), PROMPTS[1]) for seed in range(3)]
    try:
        cfg.repetition_penalty = 1.8
        changed = 0
        for seed in range(3):
            image = sample_image(seed)
            expected = hf_greedy(pipe, image, PROMPTS[1])
            changed += expected != plain[seed]
            assert pipe.generate(image, PROMPTS[1], max_new_tokens=MAX_NEW, **settings).token_ids == expected
        assert changed, "the penalty must change some outputs, or this test checks nothing"
    finally:
        cfg.repetition_penalty = 1.0


def test_beam_search_in_generation_config_is_refused(pipes):
    """generate() would run beam search; decoding greedily instead would silently change the output."""
    pipe = pipes["none"]
    cfg = pipe.target.generation_config
    try:
        cfg.num_beams = 4
        with pytest.raises(mmspec.MMSpecError, match="num_beams=4"):
            pipe.generate(sample_image(0), PROMPTS[0])
        bad = pipe.generate_batch([sample_image(0)], [PROMPTS[0]])[0]
        assert "num_beams=4" in bad.error
    finally:
        cfg.num_beams = 1


def test_unsupported_generation_settings_are_refused(pipes):
    pipe = pipes["none"]
    cfg = pipe.target.generation_config
    try:
        cfg.no_repeat_ngram_size = 3
        with pytest.raises(mmspec.MMSpecError, match="no_repeat_ngram_size=3"):
            pipe.generate(sample_image(0), PROMPTS[0])
    finally:
        cfg.no_repeat_ngram_size = 0


@pytest.mark.parametrize("kind", ["text", "ngram", "none", "scripted"])
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("batch_size", [2, 4])
def test_batched_rows_equal_their_own_generate(pipes, kind, k, batch_size):
    """generate_batch: more inputs than rows in flight (rows join as others finish), different images, prompts
    and answer lengths, and one unreadable input; every good row equals its own generate() at batch 1."""
    base = pipes["none"]
    inputs = [(sample_image(s), PROMPTS[s % 2]) for s in range(6)]
    inputs.insert(3, (b"\x89PNG broken", PROMPTS[0]))
    expected = [None if isinstance(im, bytes) else hf_greedy(base, im, p) for im, p in inputs]
    pipe = pipes.get(kind)
    if kind == "scripted":  # right for two tokens of each block, on the row's own reference
        from vision.images import load_image

        refs = {base.adapter.image_key(load_image(im)): e for (im, _), e in zip(inputs, expected) if e is not None}

        class PerRow(Drafter):
            kind, default_k = "scripted", 4

            def session(self, request, config, generator):
                return ScriptedSession(refs[request.image_key], 2, len(base.adapter.tokenizer), base.adapter.device)

        pipe = Pipeline(base.adapter, PerRow(base.adapter))
    results = pipe.generate_batch([im for im, _ in inputs], [p for _, p in inputs], batch_size=batch_size,
                                  max_new_tokens=MAX_NEW, num_draft_tokens=k)
    for i, (res, exp) in enumerate(zip(results, expected)):
        if exp is None:
            assert res.error and res.token_ids == [] and res.stats.stop_reason == "error"
        else:
            assert res.error is None and res.token_ids == exp, (i, res.rounds)
            assert res.text == base.processor.tokenizer.decode(exp, skip_special_tokens=True)
            assert res.stats.target_forwards == len(res.rounds)
    assert len({len(e) for e in expected if e is not None}) > 1, "answers of different lengths"
    if kind == "scripted":
        drafted = [r for res in results if res.error is None for r in res.rounds if len(r.draft_ids) > 2]
        assert drafted and all(r.n_accepted >= 2 or r.target_token is None for r in drafted)


def test_close_stops_the_engine_thread_and_frees_the_pipeline(tiny_target):
    """``close`` (or leaving ``with``) stops the thread the first ``submit`` started: requests it had not
    finished end with an error event (no caller waits forever), the pipeline still works, and once dropped it
    can be freed (the exit hook no longer holds the model)."""
    import gc
    import weakref

    from mmspec.scheduler import iter_job_events

    with mmspec.load(str(tiny_target), drafter=None, drafter_kind="none") as pipe:
        first = pipe.submit(sample_image(0), PROMPTS[1], max_new_tokens=MAX_NEW)
        assert list(iter_job_events(first, timeout=120))[-1].done
        thread = pipe._scheduler.thread
        many = [pipe.submit(sample_image(s), PROMPTS[1], max_new_tokens=200) for s in range(6)]
    assert not thread.is_alive() and pipe._scheduler is None
    for job in many:   # each one ends: finished before the close, or told why it was not
        last = list(iter_job_events(job, timeout=60))[-1]
        assert last.done and (last.result.error is None or "closed" in last.result.error)
    assert any(job.result.error for job in many)   # six 200-token requests cannot all finish in one round
    # still usable: generate needs no thread; a new submit starts one
    expected = pipe.generate(sample_image(1), PROMPTS[0], max_new_tokens=MAX_NEW).token_ids
    again = pipe.submit(sample_image(1), PROMPTS[0], max_new_tokens=MAX_NEW)
    assert list(iter_job_events(again, timeout=120))[-1].result.token_ids == expected
    pipe.close()
    ref = weakref.ref(pipe)
    del pipe, first, many, again, job, last
    gc.collect()
    assert ref() is None


def test_generate_batch_progress_names_each_input_as_it_finishes(pipes):
    """``progress(i, result)``: once per input, bad ones included, with the same result the call returns."""
    pipe = pipes["ngram"]
    images = [sample_image(s) for s in range(4)]
    prompts = [PROMPTS[1], "   ", PROMPTS[0], PROMPTS[1]]
    seen = []
    results = pipe.generate_batch(images, prompts, batch_size=2, max_new_tokens=MAX_NEW,
                                  progress=lambda i, r: seen.append((i, r)))
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3]
    assert all(results[i] is r for i, r in seen)
    assert results[1].error and "empty" in results[1].error and not results[0].error


def test_generate_batch_refuses_bad_arguments(pipes):
    pipe = pipes["none"]
    with pytest.raises(mmspec.MMSpecError, match="batch_size"):
        pipe.generate_batch([sample_image(0)], ["x"], batch_size=0)
    with pytest.raises(mmspec.MMSpecError, match="2 prompts"):
        pipe.generate_batch([sample_image(0)], ["x", "y"])
    with pytest.raises(mmspec.MMSpecError, match="max_new_tokens"):
        pipe.generate_batch([sample_image(0)], ["x"], max_new_tokens=0)
    assert pipe.generate_batch([], []) == []


def test_submit_from_threads_equals_generate(pipes):
    """The shared engine thread (what the demo and the server use): concurrent submissions all come back right."""
    import threading

    from mmspec.scheduler import iter_job_events

    pipe = pipes["text"]
    inputs = [(sample_image(s), PROMPTS[s % 2]) for s in range(5)]
    expected = [hf_greedy(pipe, im, p) for im, p in inputs]
    got = [None] * len(inputs)

    def client(i):
        job = pipe.submit(inputs[i][0], inputs[i][1], max_new_tokens=MAX_NEW)
        events = list(iter_job_events(job, timeout=120))
        assert events[-1].done and all(not e.done for e in events[:-1])
        got[i] = events[-1].result.token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
