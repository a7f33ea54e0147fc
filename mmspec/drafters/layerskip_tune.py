"""``mmspec tune-layerskip``: find which decoder layers the ``layerskip`` drafter skips for one target, on a few of
the user's own prompts, and save them (``mmspec.drafters.layerskip.FORMAT``) for ``drafter=FILE``.

The search is greedy (``search``): each layer is first skipped alone and ranked by how well the prompts score
without it; then layers are skipped in that order, one more at a time, keeping the best set; then, from the better
of that set and the untuned default, single layers are toggled while that improves the score (a hill climb).
``--max-evals`` bounds the sets scored.

The score is not measured speed (a shared CPU makes that noise) but a cost count that greedy decoding makes exact
and repeatable: tokens per unit of decoder work, ``tokens / (target forwards + f * (draft forwards + prompts))``
with ``f`` the share of layers the drafter runs (one draft forward costs ``f`` target forwards where a forward's
time grows with the layers it runs: a memory-bound GPU decode; the drafter's own prefill counts as one draft
forward per prompt). During the search a set is scored from ONE teacher-forced forward of the drafter per prompt
over the target's own greedy answer (``Replay``): in greedy chain drafting a draft token is fed only while the ones
before it match the target, so the drafter's predictions on the true answer give each round's accepted length
exactly (chains of ``--num-draft-tokens``, without the adaptive stop). The sets reported (the full stack, the tuned
set, the untuned default) are then run through the engine itself, and their outputs checked to be the target's.
Importing this module imports no torch: ``mmspec tune-layerskip --help`` stays light.
"""

from __future__ import annotations

import argparse
import time

from mmspec.argtypes import int_at_least
from mmspec.errors import MMSpecError
from mmspec.model_flags import add_model_flags

INTERRUPT_HINT = "nothing was written; run it again"
PATIENCE = 2   # the grow pass stops after this many sets in a row that score no better than the best


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Find the decoder layers the layerskip drafter (self-speculation: the target drafts with some of its own "
        "layers skipped) should skip for this target, by a greedy search over a few of your prompts, and save them "
        "to --out. Load them with mmspec.load(target=..., drafter_kind='layerskip', drafter=FILE) or "
        "--drafter-kind layerskip --drafter FILE. Without a tuned file the drafter skips every other middle layer.")
    parser.epilog = (
        "How: each layer is skipped alone and ranked, then layers are skipped in that order, one more at a time, "
        "keeping the best set, then single layers are toggled while that helps (from the better of that set and "
        "the untuned default). A set's score is tokens / (target forwards + f * (draft forwards + prompts)), f the "
        "share of layers it runs: a count, not a stopwatch, so the result is the same on a busy machine. The sets "
        "are scored by teacher-forcing the drafter over the target's own greedy answers; the full stack, the tuned "
        "set and the untuned default are then run through the engine and their figures written into the file. "
        "--drafter and --drafter-kind are not used (the search makes its own drafters).")
    add_model_flags(parser)
    g = parser.add_argument_group("tuning")
    g.add_argument("--data", default=None, help="folder of images or JSONL of {image, prompt} (default: scenes of the "
                                                "bundled world; required with --target)")
    g.add_argument("--prompt", action="append", default=None,
                   help="prompt(s) for a folder of images (default: 'Describe the image.')")
    g.add_argument("--out", required=True, help="the skip-set JSON to write (e.g. layerskip.json)")
    g.add_argument("--n", type=int_at_least(1), default=6, help="prompts the search runs (default 6)")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=24, help="tokens per prompt (default 24)")
    g.add_argument("--num-draft-tokens", type=int_at_least(1), default=6,
                   help="draft length of the chains scored and of the engine runs reported (default 6)")
    g.add_argument("--max-evals", type=int_at_least(1), default=200,
                   help="most skip sets scored (default 200)")
    g.add_argument("--batch-size", type=int_at_least(1), default=8, help="rows in flight per run (default 8)")
    g.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch threads (default: torch's choice; 1 wastes nothing on a busy CPU with a small model)")


def score(stats: list, kept: float) -> dict:
    """The search's score of one run (module docstring) from its results' stats."""
    tokens = sum(s.new_tokens for s in stats)
    target = sum(s.target_forwards for s in stats)
    draft = sum(s.draft_forwards for s in stats) + len(stats)
    drafted = sum(s.drafted_tokens for s in stats)
    accepted = sum(s.accepted_tokens for s in stats)
    return {"score": tokens / (target + kept * draft), "tokens_per_target_forward": tokens / max(target, 1),
            "acceptance": accepted / drafted if drafted else 0.0, "kept_fraction": kept}


def evaluate(pipe, skip: list[int], examples: list, args, reference: list | None = None) -> dict:
    """Run ``examples`` through the engine with ``skip`` (greedy, fixed draft length, adaptive stop on) ->
    ``score``'s dict; the outputs must be ``reference`` (the target's own)."""
    drafting = pipe.with_drafter_kind("layerskip", drafter=list(skip))
    results = drafting.generate_batch([e.image for e in examples], [e.prompt for e in examples],
                                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                      num_draft_tokens=args.num_draft_tokens)
    errors = [r.error for r in results if r.error]
    if errors:
        raise MMSpecError(f"a tuning prompt failed: {errors[0]}")
    if reference is not None and [r.token_ids for r in results] != reference:
        raise MMSpecError(f"skip set {skip} changed the output: mmspec is not lossless here (please report it)")
    return score([r.stats for r in results], drafting.strategy.kept_fraction)


class Replay:
    """The prompts with the target's own greedy answers, ready to score skip sets by teacher forcing."""

    def __init__(self, pipe, examples: list, args):
        import torch

        self.pipe, self.k = pipe, args.num_draft_tokens
        self.answers = [r.token_ids for r in pipe.generate_batch([e.image for e in examples],
                                                                 [e.prompt for e in examples],
                                                                 batch_size=args.batch_size,
                                                                 max_new_tokens=args.max_new_tokens)]
        adapter = pipe.adapter
        self.rows = []
        with torch.inference_mode():
            for e, answer in zip(examples, self.answers):
                job = pipe._job(e.image, e.prompt, dict(max_new_tokens=args.max_new_tokens))
                adapter.image_features(job.request)
                prompt = adapter.prompt_embeds(job.request)
                embeds = torch.cat([prompt, adapter.model.get_input_embeddings()(
                    torch.tensor([answer[:-1]], dtype=torch.long, device=adapter.device))], dim=1)
                pos = adapter.positions(job.request)(torch.arange(embeds.shape[1], device=adapter.device))[:, None]
                # [1, T] for 1-D positions, [P, 1, T] for M-RoPE (as ``TargetBatch`` passes them)
                self.rows.append((embeds, pos[0] if pos.shape[0] == 1 else pos, prompt.shape[1], answer))

    def __call__(self, skip: list[int]) -> dict:
        """``score``'s dict for greedy chains of k drafted by the skip set (module docstring)."""
        import torch

        from mmspec.drafters.layerskip import LayerSkipDrafter
        from mmspec.types import Stats

        drafter = LayerSkipDrafter(self.pipe.adapter, list(skip))
        stats = []
        with torch.inference_mode():
            for embeds, positions, L, answer in self.rows:
                hidden = drafter.view(inputs_embeds=embeds, position_ids=positions,
                                      use_cache=False).last_hidden_state[0, L - 1:]
                logits = drafter.head(hidden).float().masked_fill(drafter.bad_ids, float("-inf"))
                guess = logits.argmax(-1).tolist()        # guess[j]: the drafter's token j given answer[:j]
                s = Stats()
                t, n = 0, len(answer)
                while t < n:
                    k = max(min(self.k, n - t - 1), 0)    # never past the answer's last token (the target's own)
                    a = 0
                    while a < k and guess[t + a] == answer[t + a]:
                        a += 1
                    s.target_forwards += 1
                    s.draft_forwards += k
                    s.drafted_tokens += k
                    s.accepted_tokens += a
                    t += a + 1
                s.new_tokens = n
                stats.append(s)
        return score(stats, drafter.kept_fraction)


def search(replay: Replay, n_layers: int, args, progress=None) -> tuple[list[int], dict, list[dict]]:
    """Greedy search (module docstring) -> (best skip set, its score, every set scored), in three passes:

    1. Rank: each layer skipped alone; the better a set without it scores, the less the layer matters.
    2. Grow: skip the layers in that order, one more at a time, keeping the best set seen; stop after
       ``PATIENCE`` sets in a row score no better.
    3. Refine: from the better of that set and the untuned default, toggle one layer at a time (skip it or run
       it again), take the best toggle while it improves the score (a hill climb; it never ends worse than the
       untuned default by this score)."""
    from mmspec.drafters.layerskip import default_skip

    history, seen = [], {}

    def run(skip):
        key = tuple(sorted(skip))
        if key not in seen:
            seen[key] = dict(replay(list(key)), skip=list(key))
            history.append(seen[key])
            if progress is not None:
                progress(list(key), seen[key])
        return seen[key]

    def better(a, b):
        return a["score"] > b["score"] * (1 + 1e-3)

    best = run([])
    alone = {}
    for layer in range(n_layers):
        if len(history) >= args.max_evals:
            break
        alone[layer] = run([layer])["score"]
    skip, worse = [], 0
    for layer in sorted(alone, key=lambda layer: -alone[layer])[: n_layers - 1]:
        if len(history) >= args.max_evals:
            break
        skip = skip + [layer]
        if better(run(skip), best):
            best, worse = run(skip), 0
        else:
            worse += 1
            if worse >= PATIENCE:
                break
    if len(history) < args.max_evals and better(run(default_skip(n_layers)), best):
        best = run(default_skip(n_layers))
    while len(history) < args.max_evals:
        step = None
        for layer in range(n_layers):
            toggled = sorted(set(best["skip"]) ^ {layer})
            if len(toggled) >= n_layers or (tuple(toggled) not in seen and len(history) >= args.max_evals):
                continue
            result = run(toggled)
            if step is None or result["score"] > step["score"]:
                step = result
        if step is None or not better(step, best):
            break
        best = step
    return best["skip"], best, history


def run(args) -> int:
    from tqdm import tqdm

    from mmspec.drafters.layerskip import decoder_layers, default_skip, write_skip_file
    from mmspec.model_flags import load_kwargs
    from mmspec.outputs import FileKind, check_own_file
    from mmspec.training.data import read_examples

    check_own_file(args.out, "--out", FileKind("a layerskip skip-set file", _recognise, "layerskip.json"))
    import torch

    import mmspec

    if args.threads:
        torch.set_num_threads(args.threads)

    kw = load_kwargs(args)
    kw.update(drafter=None, drafter_kind="none")   # the target alone: the search makes its own drafters
    pipe = mmspec.load(**kw)
    n_layers = len(decoder_layers(pipe.target)[1])
    args.prompt = args.prompt or ["Describe the image."]
    args.scenes, args.heldout = args.n, 1
    train, held = read_examples(args)
    examples = (train + held)[:args.n]
    start = time.perf_counter()
    replay = Replay(pipe, examples, args)
    bar = tqdm(total=min(args.max_evals, 4 * n_layers), desc="tune-layerskip", unit="set")

    def progress(skip, result):
        bar.update()
        bar.set_postfix(skip=len(skip), score=f"{result['score']:.3f}", acc=f"{result['acceptance']:.2f}")

    try:
        skip, best, history = search(replay, n_layers, args, progress)
    finally:
        bar.close()
    keep = ("score", "tokens_per_target_forward", "acceptance", "kept_fraction")
    # the sets reported, through the engine itself (adaptive stop on), each output checked against the target's
    measured = {name: dict({k: round(v, 4) for k, v in evaluate(pipe, s, examples, args, replay.answers).items()},
                           skip=s)
                for name, s in (("full_stack", []), ("tuned", skip), ("untuned_default", default_skip(n_layers)))}
    write_skip_file(args.out, pipe.target, skip, acceptance=round(measured["tuned"]["acceptance"], 3),
                    tuning={"objective": "tokens / (target forwards + kept_fraction * (draft forwards + prompts))",
                            "search": "greedy (rank layers skipped alone, grow, then toggle single layers), sets scored by "
                                      "teacher-forced greedy chains", "examples": len(examples),
                            "max_new_tokens": args.max_new_tokens, "num_draft_tokens": args.num_draft_tokens,
                            "sets_scored": len(history), "seconds": round(time.perf_counter() - start, 1),
                            "search_score": {k: round(best[k], 4) for k in keep},
                            "search_full_stack": {k: round(history[0][k], 4) for k in keep}, "engine": measured})
    t = measured["tuned"]
    print(f"skip {skip} of {n_layers} layers: {t['tokens_per_target_forward']:.2f} tokens per target forward, "
          f"acceptance {t['acceptance']:.2f}, score {t['score']:.3f} (full stack {measured['full_stack']['score']:.3f}, "
          f"untuned default {measured['untuned_default']['score']:.3f}; through the engine); wrote {args.out}")
    return 0


def _recognise(head: bytes) -> None:
    import json

    from mmspec.drafters.layerskip import FORMAT
    from mmspec.outputs import NotOurs

    try:
        data = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise NotOurs("it is not JSON") from None
    if not (isinstance(data, dict) and data.get("format") == FORMAT):
        raise NotOurs(f"it has no format {FORMAT!r}")
