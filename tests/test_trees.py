"""Tree drafting and verification: masks and positions, acceptance rules, the KV gather, and lossless output.

Every family runs trees through tests/tiny_families.py (``check_trees``); here: hand-made trees and masks, the
greedy rule where a deep branch wins over the first child, the sampling rule against a hand-made p (chi-square,
as tests/test_sampling.py), the cache after committing a non-first branch against a fresh prefill, and greedy
equality with trees of several sizes on the tiny LLaVA, at batch 1 and batched, for the text drafter and for vlm
drafters (a smaller LLaVA sharing the target's vision tower, and one with its own).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmspec
from mmspec.acceptance import accept_tree_greedy, accept_tree_sampling
from mmspec.drafters.base import Draft, Drafter, DraftSession
from mmspec.kv import SlotCache
from mmspec.pipeline import Pipeline
from mmspec.trees import ancestor_matrix, grow_tree
from tests.test_sampling import P_MIN, _chi2_p
from tests.tiny import build_tiny_llava, sample_image
from tests.tiny_families import check_trees, check_vlm_tree_node_logits

PROMPTS = ["what color is the circle ?", "describe the image ."]
MAX_NEW = 20

#        root (pending)
#        ├── 0: a ── 2: c ── 4: e
#        └── 1: b ── 3: d
#                └── 5: f ── 6: g
IDS = [10, 11, 12, 13, 14, 15, 16]
PARENTS = [-1, -1, 0, 1, 2, 1, 5]


def hf_greedy(pipe, image, prompt, max_new_tokens=MAX_NEW):
    inputs = pipe.processor(images=image, text=pipe.adapter.format_prompt(prompt), return_tensors="pt")
    out = pipe.target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_ancestor_matrix_and_tree_mask_and_positions():
    verify_parents = [-1] + [p + 1 for p in PARENTS]           # node 0 = the pending token
    anc = ancestor_matrix(verify_parents, "cpu")
    assert anc[7].nonzero().flatten().tolist() == [0, 2, 6, 7]   # g: pending, b, f, g
    assert anc[5].nonzero().flatten().tolist() == [0, 1, 3, 5]   # e: pending, a, c, e
    cfg = mmspec.load(drafter=None, drafter_kind="none").target.config.get_text_config()
    slots = SlotCache(cfg, "cpu", torch.float32)
    slots.add_empty(0)
    slots.extend([[-1, 0, 1]])                                    # three committed positions
    slots.commit([[0, 1, 2]])
    mask, pos = slots.extend([verify_parents])
    allowed = mask[0, 0] == 0
    assert allowed.shape == (8, 3 + 8)
    assert allowed[:, :3].all()                                   # everyone sees the committed prefix
    assert allowed[7, 3:].nonzero().flatten().tolist() == [0, 2, 6, 7]
    assert not allowed[6, 3 + 4]                                  # d never sees its cousin c
    assert pos[0].tolist() == [3, 4, 4, 5, 5, 6, 5, 6]            # positions by depth


def test_one_dense_row_hands_the_target_no_mask_and_gets_the_same_logits():
    """The target's slots give transformers' decoder ``attention_mask=None`` (its own causal mask, the path of
    its batch-1 generate) only for one row (always dense: a lone row is gathered) adding a chain; the logits
    are those of the explicit mask, and trees and batches still get the explicit one."""
    from mmspec.targets.batch import TargetBatch

    cfg = mmspec.load(drafter=None, drafter_kind="none").target.config.get_text_config()
    slots = SlotCache(cfg, "cpu", torch.float32)
    slots.none_means = "causal"
    slots.add_empty(0)
    mask, pos = slots.extend([[-1, 0, 1]])
    assert mask is None and pos[0].tolist() == [0, 1, 2]
    slots.commit([[0, 1]])                                        # the third was a rejected draft: cropped
    mask, pos = slots.extend([[-1]])
    assert mask is None and pos[0].tolist() == [2]
    slots.commit([[0]])
    assert slots.extend([[-1, 0, 0]])[0] is not None              # a tree
    slots.commit([[0, 2]])                                        # its kept path is gathered: dense again
    assert slots.extend([[-1]])[0] is None
    two = SlotCache(cfg, "cpu", torch.float32)
    two.none_means = "causal"
    two.add_empty(0)
    two.add_empty(1)
    assert two.extend([[-1, 0, 1], [-1]])[0] is not None          # a batch
    two.commit([[0, 1, 2], [0]])                                  # row 1 took part as padding: holes
    two.extend([[-1], [-1]])
    two.commit([[0], [0]])
    two.remove([0])                                               # a lone row is gathered at once
    assert two.length(1) == two.slots and two.extend([[-1]])[0] is None
    pipe = mmspec.load(drafter=None, drafter_kind="none")
    adapter = pipe.adapter
    req = adapter.prepare(sample_image(2), adapter.format_prompt("Describe the image."))
    adapter.image_features(req)
    out = {}
    with torch.inference_mode():
        for causal in (True, False):
            batch = TargetBatch(adapter)
            batch.main.none_means = "causal" if causal else None
            batch._slots = lambda causal=causal: _slots_with(batch, causal)
            batch.add(0, req)
            first = batch.verify({0: torch.tensor([req.prompt_ids[-1], 5, 6])})[0]
            batch.commit({0: [0, 1]})
            second = batch.verify({0: torch.tensor([7, 8, 9, 10])})[0]
            out[causal] = (first, second)
    for a, b in zip(out[True], out[False]):
        assert torch.allclose(a, b, atol=1e-5)


def _slots_with(batch, causal):
    slots = SlotCache(batch.config, batch.device, batch.dtype)
    slots.none_means = "causal" if causal else None
    return slots


def test_greedy_rule_takes_a_deep_branch_over_the_first_child():
    # the target says b, f, g, then 99: the path 1 -> 5 -> 6 (the second child, then the deep branch)
    target = {0: 11, 2: 15, 6: 16, 7: 99}
    target_ids = [target.get(i, 0) for i in range(len(IDS) + 1)]
    path, token = accept_tree_greedy(IDS, PARENTS, target_ids)
    assert path == [1, 5, 6] and token == 99
    # the target disagrees at the root: nothing accepted, its own token
    assert accept_tree_greedy(IDS, PARENTS, [42] * 8) == ([], 42)


def test_sampling_rule_on_a_hand_made_p_follows_the_target():
    """Children tried in order, each accepted with what is left of p: the first emitted token ~ p[root], the
    second (after b was accepted) ~ p[b]."""
    g = torch.Generator().manual_seed(0)
    vocab = 20
    p = torch.softmax(torch.randn(len(IDS) + 1, vocab, generator=g) * 1.5, -1)
    p[0, 10] += 0.3      # make the drafted root children likely enough to be accepted often
    p[0] /= p[0].sum()
    first, second = [], []
    for _ in range(20000):
        path, token = accept_tree_sampling(IDS, PARENTS, p, g)
        emitted = [IDS[i] for i in path] + [token]
        first.append(emitted[0])
        if path and path[0] == 1:
            second.append(emitted[1])
    assert _chi2_p(np.bincount(first, minlength=vocab), p[0].numpy()) > P_MIN
    assert _chi2_p(np.bincount(second, minlength=vocab), p[2].numpy()) > P_MIN
    # a broken rule (always accepting the first child) is caught by the same check
    broken = [IDS[0]] * 20000
    assert _chi2_p(np.bincount(broken, minlength=vocab), p[0].numpy()) < 1e-10


def test_committing_a_branch_gathers_its_entries(tmp_path):
    """Verify a tree, keep the second branch, then the next logits equal a fresh prefill of the kept sequence."""
    pipe = mmspec.load(drafter=None, drafter_kind="none")
    adapter = pipe.adapter
    image = sample_image(1)
    req = adapter.prepare(image, adapter.format_prompt("Describe the image."))
    adapter.image_features(req)
    from mmspec.targets.batch import TargetBatch

    with torch.inference_mode():
        batch = TargetBatch(adapter)
        batch.add(0, req)
        ids = torch.tensor([req.prompt_ids[-1]] + [5, 6, 7, 8, 9, 10, 11])
        batch.verify({0: ids}, {0: [-1] + [p + 1 for p in PARENTS]})
        batch.commit({0: [0, 2, 6, 7]})                           # pending, b, f, g
        assert batch.length(0) == len(req.prompt_ids) + 3
        after = batch.verify({0: torch.tensor([12, 13])})[0]
        fresh = TargetBatch(adapter)
        fresh.add(0, req)
        ref = fresh.verify({0: torch.tensor([req.prompt_ids[-1], 6, 10, 11, 12, 13])})[0]
    assert torch.allclose(after, ref[-2:], atol=1e-4)


class TreeScript(DraftSession):
    """A hand-made tree per round from the reference: the first child wrong, the second right, then a chain
    under it whose third node is wrong -- so the accepted path is always the deep second branch."""

    def __init__(self, reference, vocab, device):
        self.reference, self.vocab, self.device = reference, vocab, device
        self.n = 0
        self.forwards = 0

    def propose(self, k):
        ref = lambda i: self.reference[self.n + i] if self.n + i < len(self.reference) else 5  # noqa: E731
        wrong = lambda i: (ref(i) + 1) % self.vocab  # noqa: E731
        ids = [wrong(0), ref(0), ref(1), ref(2), wrong(3)]
        parents = [-1, -1, 1, 2, 3]
        return Draft(torch.tensor(ids, dtype=torch.long, device=self.device), parents=parents)

    def update(self, n_accepted, emitted):
        self.n += len(emitted)


@pytest.fixture(scope="module")
def pipes(tiny_target, tiny_drafter):
    return {kind: mmspec.load(str(tiny_target), drafter=str(tiny_drafter) if kind == "text" else None,
                              drafter_kind=kind) for kind in ("text", "none")}


def test_a_scripted_tree_round_accepts_the_deep_second_branch(pipes):
    base = pipes["none"]
    image, prompt = sample_image(2), PROMPTS[1]
    expected = hf_greedy(base, image, prompt)

    class Scripted(Drafter):
        kind, default_k, grows_trees = "tree-script", 4, True

        def session(self, request, config, generator):
            return TreeScript(expected, len(base.adapter.tokenizer), base.adapter.device)

    pipe = Pipeline(base.adapter, Scripted(base.adapter))
    res = pipe.generate(image, prompt, max_new_tokens=MAX_NEW, tree_nodes=5, num_draft_tokens=4)
    assert res.token_ids == expected
    full = [r for r in res.rounds if r.target_token is not None][:-1]
    assert full and all(r.n_accepted == 3 for r in full)
    # the trace: the accepted path first (b, then its chain), then the rejected nodes, with parents
    r = full[0]
    assert r.parents[:3] == (-1, 0, 1) and len(r.draft_ids) == 5


@pytest.mark.parametrize("tree_nodes, depth, floor", [(1, 1, 0.02), (4, 3, 0.0), (8, 4, 0.02), (24, 6, 0.0)])
def test_text_drafter_trees_match_hf_greedy(pipes, tree_nodes, depth, floor, monkeypatch):
    pipe, base = pipes["text"], pipes["none"]
    monkeypatch.setattr(pipe.strategy, "tree_floor", floor)
    images = [sample_image(s) for s in range(4)]
    prompts = [PROMPTS[s % 2] for s in range(4)]
    expected = [hf_greedy(base, im, p) for im, p in zip(images, prompts)]
    for im, p, exp in zip(images, prompts, expected):
        res = pipe.generate(im, p, max_new_tokens=MAX_NEW, tree_nodes=tree_nodes, num_draft_tokens=depth)
        assert res.token_ids == exp
        assert all(len(r.draft_ids) <= tree_nodes for r in res.rounds)
    batched = pipe.generate_batch(images, prompts, batch_size=3, max_new_tokens=MAX_NEW, tree_nodes=tree_nodes,
                                  num_draft_tokens=depth)
    assert [r.token_ids for r in batched] == expected


def test_the_floor_keeps_sure_paths_and_stops_growth():
    """grow_tree with a floor: nodes under it are neither fed nor kept (the best first token always is), and
    growth stops when no frontier node clears it. Here every node's children get probabilities 0.9 / 0.1."""
    vocab = 6
    lp = torch.log(torch.tensor([0.9, 0.1, 1e-9, 1e-9, 1e-9, 1e-9]))
    fed = []

    def expand(feeds):
        fed.append([len(f) for f in feeds])
        return [lp.expand(len(f), vocab) if f else None for f in feeds]

    first = lp[None].clone()
    [bushy] = grow_tree(first, expand, [30], 6, frozenset(), branch=2)
    [thin] = grow_tree(first, expand, [30], 6, frozenset(), branch=2, floor=0.3)
    # with the floor: the 0.9 chain down to the depth limit (0.9^6 > 0.3), no 0.1 sibling (under the floor)
    assert thin.ids.tolist() == [0] * 6 and thin.parents == [-1, 0, 1, 2, 3, 4]
    assert len(bushy) > len(thin) and 1 in bushy.ids.tolist()
    [short] = grow_tree(first, expand, [30], 16, frozenset(), branch=2, floor=0.5)
    assert short.ids.tolist() == [0] * 6          # 0.9^7 = 0.478 < 0.5: six nodes, growth stopped there
    assert short.forwards == 7                      # the first logits, then the six nodes fed (not 16 depths)
    [none] = grow_tree(torch.log(torch.full((1, vocab), 1 / vocab)), expand, [30], 6, frozenset(), floor=0.5)
    assert len(none) == 0 and none.parents == []    # nothing clears the floor: nothing drafted
    # end-of-sequence tokens are never nodes (the target's own token after an accepted node gives them)
    [no_eos] = grow_tree(first, expand, [30], 6, frozenset({0}), branch=2)
    assert 0 not in no_eos.ids.tolist() and len(no_eos) and set(no_eos.ids.tolist()) == {1}


@pytest.fixture(scope="module")
def vlm_pipes(tiny_target, tmp_path_factory):
    root = tmp_path_factory.mktemp("tree-vlm")
    shared = build_tiny_llava(root / "vlm", vocab_pad=2, seed=3, layers=1, vision_from=tiny_target)
    own = build_tiny_llava(root / "vlm-own", vocab_pad=9, seed=4, layers=1)
    return {kind: mmspec.load(str(tiny_target), drafter=str(folder), drafter_kind="vlm")
            for kind, folder in (("vlm", shared), ("vlm-own", own))}


@pytest.mark.parametrize("kind", ["vlm", "vlm-own"])
def test_vlm_drafter_trees_match_hf_greedy(vlm_pipes, kind):
    pipe = vlm_pipes[kind]
    assert pipe.strategy.grows_trees and pipe.strategy.shared_vision == (kind == "vlm")
    check_trees(pipe, [sample_image(s) for s in range(3)], MAX_NEW)


def test_vlm_tree_nodes_see_their_own_path(pipes):
    check_vlm_tree_node_logits(pipes["none"], [sample_image(1), sample_image(2)])


def test_a_batch_mixing_tree_and_chain_rows_matches_hf_greedy(pipes):
    """Rows with and without tree_nodes in one engine (server clients with different settings): both kinds
    take turns drafting, every row equals generate()."""
    from tests.tiny_families import run_engine

    pipe, base = pipes["text"], pipes["none"]
    images = [sample_image(s) for s in range(4)]
    prompts = [PROMPTS[s % 2] for s in range(4)]
    settings = [dict(tree_nodes=8, num_draft_tokens=4), dict(num_draft_tokens=3), dict(tree_nodes=4), {}]
    jobs = [pipe._job(im, p, dict(max_new_tokens=MAX_NEW, **s)) for im, p, s in zip(images, prompts, settings)]
    run_engine(pipe, jobs, max_batch=4)
    assert [j.result.token_ids for j in jobs] == [hf_greedy(base, im, p) for im, p in zip(images, prompts)]
    assert all(j.result.error is None for j in jobs)
    assert any(r.parents for r in jobs[0].result.rounds) and any(r.draft_ids and r.parents is None
                                                               for r in jobs[1].result.rounds)


@pytest.mark.parametrize("kind", ["none", "ngram"])
def test_trees_are_refused_where_the_drafter_cannot_grow_them(pipes, kind):
    pipe = pipes["none"] if kind == "none" else pipes["none"].with_drafter_kind(kind)
    with pytest.raises(mmspec.MMSpecError, match="does not draft trees.*'vlm'"):
        pipe.generate(sample_image(0), PROMPTS[0], tree_nodes=8)
    with pytest.raises(mmspec.MMSpecError, match="tree_nodes must be"):
        pipes["text"].generate(sample_image(0), PROMPTS[0], tree_nodes=0)


# ----- trees that adapt their shape (issue 31) ---------------------------------------------------------
def _expand_with(table):
    """expand() whose every fed node's children get log-probabilities ``table`` (the same at every node)."""
    def expand(feeds):
        return [table.expand(len(f), table.shape[-1]) if f else None for f in feeds]
    return expand


def test_a_sure_drafter_grows_the_chain_and_a_hesitant_one_grows_width():
    sure = torch.log(torch.tensor([0.97, 0.02, 0.01, 1e-9, 1e-9, 1e-9]))
    [tree] = grow_tree(sure[None].clone(), _expand_with(sure), [16], 6, frozenset(), floor=0.05, spines=[6])
    assert tree.ids.tolist() == [0] * 6 and tree.parents == [-1, 0, 1, 2, 3, 4]     # the chain, nothing more
    unsure = torch.log(torch.tensor([0.5, 0.4, 0.05, 0.05, 1e-9, 1e-9]))
    [bushy] = grow_tree(unsure[None].clone(), _expand_with(unsure), [16], 6, frozenset(), floor=0.05, spines=[6])
    assert len(bushy) == 16 and 1 in bushy.ids.tolist()                              # width where it hesitates
    # the spine (the top token after each spine node, 6 deep) is kept though 0.5^6 is under the floor
    deepest = max(range(len(bushy)), key=lambda i: len(_path(bushy.parents, i)))
    assert [bushy.ids[i].item() for i in _path(bushy.parents, deepest)] == [0] * 6
    # the budget is the budget: spine first, then the best other nodes; a spine longer than it is cut
    [small] = grow_tree(unsure[None].clone(), _expand_with(unsure), [8], 6, frozenset(), floor=0.05, spines=[6])
    assert len(small) == 8 and sum(t == 0 for t in small.ids.tolist()) >= 6
    [three] = grow_tree(unsure[None].clone(), _expand_with(unsure), [3], 6, frozenset(), floor=0.05, spines=[6])
    assert three.ids.tolist() == [0, 0, 0] and three.parents == [-1, 0, 1]
    # no spine: the old EAGLE-2 shape (the floor stops the 0.5 chain after 4 nodes: 0.5^5 < 0.05)
    [old] = grow_tree(unsure[None].clone(), _expand_with(unsure), [3], 6, frozenset(), floor=0.05)
    assert old.ids.tolist() == [0, 1, 0]


def _path(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


def test_a_tree_with_a_spine_holds_the_chain_and_never_accepts_less():
    """Path-dependent drafter logits: the spine is the chain draft_block drafts; for random targets the tree's
    greedy acceptance is never below the chain's."""
    from mmspec.config import DecodeConfig
    from mmspec.drafters.base import RowSpec, draft_block

    vocab, k = 7, 5

    def logits_after(path):
        g = torch.Generator().manual_seed(hash(tuple(path)) % (2**31))
        return torch.randn(vocab, generator=g) * 2

    paths = {}

    def expand(feeds):                       # records each fed node's token path
        out = []
        for f in feeds:
            for node, tok, parent, _ in f:
                paths[node] = (paths[parent] if parent >= 0 else []) + [tok]
            out.append(torch.stack([logits_after(paths[node]) for node, *_ in f]) if f else None)
        return out

    first = logits_after([])[None]
    [tree] = grow_tree(first, expand, [12], k, frozenset(), floor=0.2, spines=[k])
    fed = []

    def step(tok):
        fed.append(int(tok[0]))
        return logits_after(fed)[None]

    [chain_draft] = draft_block(first, step, [k], [RowSpec(None, DecodeConfig())], vocab, frozenset())
    chain_ids = chain_draft.ids.tolist()
    node_paths = [[tree.ids[j].item() for j in _path(tree.parents, i)] for i in range(len(tree))]
    assert len(chain_ids) == k and chain_ids in node_paths
    for seed in range(300):
        def target(prefix):   # the target's argmax after a prefix: the drafter's top token 70 % of the time
            h = hash((seed,) + tuple(prefix)) % 10
            return int(logits_after(list(prefix)).argmax()) if h < 7 else h % vocab
        n_chain = 0
        while n_chain < k and target(chain_ids[:n_chain]) == chain_ids[n_chain]:
            n_chain += 1
        path, _ = accept_tree_greedy(tree.ids.tolist(), tree.parents, [target([])] + [target(p) for p in node_paths])
        assert len(path) >= n_chain


def test_tree_masks_and_positions_for_a_batch_in_one_go_equal_row_by_row():
    """``SlotCache.extend`` builds every row's tree mask and positions at once: the same as the per-row
    construction (ancestors by walking parents) for random trees, padding rows and trees grown over forwards."""
    import random

    from transformers import LlamaConfig

    from mmspec.trees import ancestor_matrices, depths

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                      vocab_size=32)
    rnd = random.Random(0)
    for trial in range(40):
        B = rnd.randint(1, 4)
        slots = SlotCache(cfg, "cpu", torch.float32)
        for r in range(B):
            slots.add_empty(r)
        pre = [rnd.randint(1, 5) for _ in range(B)]
        slots.extend([list(range(-1, n - 1)) for n in pre])
        slots.commit([list(range(n)) for n in pre])
        parents = []
        for _ in range(B):
            n = rnd.randint(0, 9)
            chainy = rnd.random() < 0.3
            parents.append([i - 1 if chainy else rnd.randint(-1, i - 1) for i in range(n)])
        T = max(len(p) for p in parents)
        if not T:
            continue
        S = slots.slots
        lengths, valid = list(slots.lengths), slots.valid.clone()
        mask, pos = slots.extend(parents)
        for b, par in enumerate(parents):
            n = len(par)
            anc = torch.eye(T, dtype=torch.bool)
            for i, p in enumerate(par):
                if p >= 0:
                    anc[i, :i] |= anc[p, :i]
                    anc[i, p] = True
            assert torch.equal(ancestor_matrices(parents, T, "cpu")[b], anc)
            allowed = mask[b, 0] == 0
            assert torch.equal(allowed[:n, S:], anc[:n])
            assert torch.equal(allowed[:n, :S], valid[b].expand(n, S))
            assert not allowed[n:, :S].any() and torch.equal(allowed[n:, S + n:], torch.eye(T - n, dtype=torch.bool))
            assert pos[b].tolist() == [lengths[b] + d for d in depths(par)] + [lengths[b]] * (T - n)
        slots.commit([[] for _ in parents])


def test_adaptive_trees_match_hf_greedy_and_respect_the_budget(pipes):
    """Trees whose depth the draft-length policy picks (no num_draft_tokens) and whose width the cost-based
    floor sets: lossless at batch 1 and batched, never more than tree_nodes nodes, and never more nodes than a
    chain of the round's depth plus the width the drafter's doubts earned."""
    pipe, base = pipes["text"], pipes["none"]
    images = [sample_image(s) for s in range(3)]
    prompts = [PROMPTS[s % 2] for s in range(3)]
    expected = [hf_greedy(base, im, p) for im, p in zip(images, prompts)]
    for nodes in (3, 10):
        for im, p, exp in zip(images, prompts, expected):
            res = pipe.generate(im, p, max_new_tokens=MAX_NEW, tree_nodes=nodes)
            assert res.token_ids == exp
            assert all(len(r.draft_ids) <= nodes for r in res.rounds)
        batched = pipe.generate_batch(images, prompts, batch_size=3, max_new_tokens=MAX_NEW, tree_nodes=nodes)
        assert [r.token_ids for r in batched] == expected
