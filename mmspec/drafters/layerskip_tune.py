"""``mmspec tune-layerskip``: find which decoder layers the ``layerskip`` drafter skips for one target, on a few of
the user's own prompts, and save them (``mmspec.drafters.layerskip.FORMAT``) for ``drafter=FILE``.

The search is greedy (``search``): each layer is first skipped alone and ranked by how well the prompts run without
it; then layers are skipped in that order, one more at a time, through the engine, keeping the best set; it stops
when the score stops improving or ``--max-evals`` runs are spent.

The score is not measured speed (a shared CPU makes that noise) but a cost count that greedy decoding makes exact
and repeatable: tokens per unit of decoder work, ``tokens / (target forwards + f * (draft forwards + prompts))``
with ``f`` the share of layers the drafter runs (one draft forward costs ``f`` target forwards where a forward's
time grows with the layers it runs: a memory-bound GPU decode; the drafter's own prefill counts as one draft
forward per prompt). Drafts run at a fixed length (``--num-draft-tokens``, under the adaptive stop) so nothing in
the search depends on timing. Importing this module imports no torch: ``mmspec tune-layerskip --help`` is light.
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
                   help="draft length during the search (default 6; the adaptive stop may end drafts sooner)")
    g.add_argument("--max-evals", type=int_at_least(1), default=200,
                   help="most skip sets tried (each runs every prompt; default 200)")
    g.add_argument("--batch-size", type=int_at_least(1), default=8, help="rows in flight per run (default 8)")


def score(stats: list, kept: float) -> dict:
    """The search's score of one run (module docstring) from its results' stats."""
    tokens = sum(s.new_tokens for s in stats)
    target = sum(s.target_forwards for s in stats)
    draft = sum(s.draft_forwards for s in stats) + len(stats)
    drafted = sum(s.drafted_tokens for s in stats)
    accepted = sum(s.accepted_tokens for s in stats)
    return {"score": tokens / (target + kept * draft), "tokens_per_target_forward": tokens / max(target, 1),
            "acceptance": accepted / drafted if drafted else 0.0, "kept_fraction": kept}


def evaluate(pipe, skip: list[int], examples: list, args) -> dict:
    """Run ``examples`` with ``skip`` (greedy, fixed draft length) -> ``score``'s dict; every output is checked
    against the first run's (the search never trusts a run that was not lossless)."""
    drafting = pipe.with_drafter_kind("layerskip", drafter=list(skip))
    results = drafting.generate_batch([e.image for e in examples], [e.prompt for e in examples],
                                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                      num_draft_tokens=args.num_draft_tokens)
    errors = [r.error for r in results if r.error]
    if errors:
        raise MMSpecError(f"a tuning prompt failed: {errors[0]}")
    out = score([r.stats for r in results], drafting.strategy.kept_fraction)
    out["ids"] = [r.token_ids for r in results]
    return out


def search(pipe, examples: list, args, progress=None) -> tuple[list[int], dict, list[dict]]:
    """Greedy search in two passes (module docstring) -> (best skip set, its evaluation, every evaluation made).

    1. Rank: each layer skipped alone; the better a set without it scores, the less the layer matters.
    2. Grow: skip the layers in that order, one more at a time, and keep the best set seen; stop after
       ``PATIENCE`` sets in a row score no better. About 2 x layers runs instead of the layers^2 / 2 of a full
       greedy forward selection (each run decodes every prompt)."""
    from mmspec.drafters.layerskip import decoder_layers

    n = len(decoder_layers(pipe.target)[1])
    history = []

    def run(skip):
        result = evaluate(pipe, skip, examples, args)
        if history and result["ids"] != history[0]["ids"]:
            raise MMSpecError(f"skip set {skip} changed the output: mmspec is not lossless here (please report it)")
        history.append(dict(result, skip=sorted(skip)))
        if progress is not None:
            progress(sorted(skip), result)
        return history[-1]

    best = run([])
    alone = {}
    for layer in range(n):
        if len(history) >= args.max_evals:
            break
        alone[layer] = run([layer])["score"]
    order = sorted(alone, key=lambda layer: -alone[layer])
    skip, worse = [], 0
    for layer in order[: n - 1]:
        skip = skip + [layer]
        result = next((h for h in history if h["skip"] == sorted(skip)), None) or (
            run(skip) if len(history) < args.max_evals else None)
        if result is None:
            break
        if result["score"] > best["score"] * (1 + 1e-3):
            best, worse = result, 0
        else:
            worse += 1
            if worse >= PATIENCE:
                break
    return best["skip"], best, history


def run(args) -> int:
    from tqdm import tqdm

    from mmspec.drafters.layerskip import decoder_layers, default_skip, write_skip_file
    from mmspec.model_flags import load_kwargs
    from mmspec.outputs import FileKind, check_own_file
    from mmspec.training.data import read_examples

    check_own_file(args.out, "--out", FileKind("a layerskip skip-set file", _recognise, "layerskip.json"))
    import mmspec

    kw = load_kwargs(args)
    kw.update(drafter=None, drafter_kind="none")   # the target alone: the search makes its own drafters
    pipe = mmspec.load(**kw)
    n_layers = len(decoder_layers(pipe.target)[1])
    args.prompt = args.prompt or ["Describe the image."]
    args.scenes, args.heldout = args.n, 1
    train, held = read_examples(args)
    examples = (train + held)[:args.n]
    start = time.perf_counter()
    bar = tqdm(total=min(args.max_evals, 2 * n_layers), desc="tune-layerskip", unit="set")

    def progress(skip, result):
        bar.update()
        bar.set_postfix(skip=len(skip), score=f"{result['score']:.3f}", acc=f"{result['acceptance']:.2f}")

    try:
        skip, best, history = search(pipe, examples, args, progress)
    finally:
        bar.close()
    untuned = evaluate(pipe, default_skip(n_layers), examples, args)
    keep = ("score", "tokens_per_target_forward", "acceptance", "kept_fraction")
    write_skip_file(args.out, pipe.target, skip, acceptance=round(best["acceptance"], 3),
                    tuning={"objective": "tokens / (target forwards + kept_fraction * (draft forwards + prompts))",
                            "search": "greedy: rank layers skipped alone, then grow", "examples": len(examples),
                            "max_new_tokens": args.max_new_tokens, "num_draft_tokens": args.num_draft_tokens,
                            "evaluations": len(history), "seconds": round(time.perf_counter() - start, 1),
                            "full_stack": {k: round(history[0][k], 4) for k in keep},
                            "tuned": {k: round(best[k], 4) for k in keep},
                            "untuned_default": dict({k: round(untuned[k], 4) for k in keep},
                                                    skip=default_skip(n_layers))})
    print(f"skip {skip} of {n_layers} layers: {best['tokens_per_target_forward']:.2f} tokens per target forward, "
          f"acceptance {best['acceptance']:.2f}, score {best['score']:.3f} (full stack {history[0]['score']:.3f}, "
          f"untuned default {untuned['score']:.3f}); wrote {args.out}")
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
