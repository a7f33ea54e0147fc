"""``mmspec bench``: mmspec side by side with transformers, same inputs, same process, interleaved.

Modes: ``hf-greedy`` (the target's own ``generate``, the baseline), ``hf-assisted`` (``assistant_model=`` the same
text drafter), ``hf-prompt-lookup``, and every mmspec drafter kind available for the pair. Each timed call
includes preprocessing and the vision tower: mmspec's image cache is cleared before every timed call, so the
headline numbers never profit from having seen an image before; the warm-cache effect is reported separately
as time to first token (cold vs warm).

A mode's tokens/s over a set of inputs is that of each timed pass (the pass's tokens over its seconds), median
over the passes: what a user running that set would see. The median of the per-call rates is reported beside
it, but it is no speed for a mixed set: with one-word answers and captions half and half, it falls in the gap
between the two clusters and moves with whichever call lands nearest.

``--verify-cost NODES`` measures instead what one round's target forward costs against a plain decoding step
(``verify_cost``).

Rooms: ``modes`` (what each mode runs and the interleaved timed passes), ``report`` (rows, tables, plot),
``shaped`` (``--shaped``), ``verify_cost`` (``--verify-cost``); this file is the subcommand (its flags, and a run
from loading the models to writing the report).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmspec.argtypes import int_list
from mmspec.bench.modes import Bench, folder_inputs, scene_inputs
from mmspec.bench.report import batched_summary, batched_table, machine_info, markdown_table, plot, summary
from mmspec.errors import MMSpecError
from mmspec.model_flags import add_model_flags

VERIFY_COST_NODES = "1,2,4,8,16,32"   # --verify-cost given bare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--n", type=int, default=12, help="number of scenes / images (default 12)")
    g.add_argument("--prompt-types", default="caption,question", help="caption,question (default both)")
    g.add_argument("--images", default=None, help="folder of images instead of the bundled world's scenes")
    g.add_argument("--caption-prompt", default="Describe the image.", help="caption prompt for --images")
    g.add_argument("--question-prompt", default="What is in the image?", help="question prompt for --images")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--repeats", type=int, default=None,
                   help="timed passes over all inputs (default 2; with --verify-cost, passes per median: 30)")
    g.add_argument("--warmup", type=int, default=2,
                   help="untimed inputs per mode first (default 2; with --verify-cost, untimed passes)")
    g.add_argument("--temperature", type=float, default=0.0, help="> 0 benchmarks sampling (no lossless check)")
    g.add_argument("--num-draft-tokens", type=int, default=None, help="fixed k for mmspec (default: adaptive)")
    g.add_argument("--visual-drafter", default="default",
                   help="also time this visual drafter folder (default: the bundled one with the bundled target; "
                        "'none' to skip)")
    g.add_argument("--lookup-tokens", type=int, default=4, help="prompt_lookup_num_tokens for hf-prompt-lookup")
    g.add_argument("--eagle-drafter", default="default",
                   help="also time this eagle head folder as mmspec-eagle (default: the bundled one with the bundled "
                        "target; 'none' to skip)")
    g.add_argument("--eagle3-drafter", default="default",
                   help="also time this EAGLE-3 head folder as mmspec-eagle3, beside mmspec-eagle (default: the "
                        "bundled assets/models/eagle3-drafter with the bundled target; 'none' to skip)")
    g.add_argument("--tree-nodes", type=int, default=None,
                   help="nodes per round of the mmspec-<kind>-tree modes (0 = no tree modes; default: each "
                        "drafter's own, 32 for eagle and 16 for text and visual)")
    g.add_argument("--batch-size", default="1", type=int_list(1),
                   help="comma list of batch sizes for the throughput table, e.g. 1,4,16: at each, hf-greedy's "
                        "batched generate() and every mmspec mode (generate_batch) over all inputs (default 1)")
    g.add_argument("--modes", default="", help="comma list to restrict modes (hf-greedy is always run)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--shaped", default=None, metavar="SIZE",
                   help="GPU-shaped estimate: a random-weight target whose language model has this shape (1b, 3b; "
                        "smoke: a small check) in --dtype (default float32), timed with an always-right "
                        "(mmspec-oracle) and a replayed drafter (mmspec-replay) on the bundled world's scenes")
    g.add_argument("--replay-profile", default=None,
                   help="with --shaped: mmspec-replay's chance to be right at draft position 1, 2, ... (comma list; "
                        "default: the bundled eagle head's measured acceptance on captions)")
    g.add_argument("--verify-cost", nargs="?", const=VERIFY_COST_NODES, default=None, type=int_list(1),
                   metavar="NODES",
                   help="instead of timing requests: what one round's target forward costs after the first input's "
                        "prompt, against a plain 1-token step: a verify of n tokens as a chain and as a tree for each n "
                        f"of NODES (a comma list; bare: {VERIFY_COST_NODES}), per row at each --batch-size, and with "
                        "--drafter-kind layerskip one draft step of its skip set; medians of --repeats passes")
    g.add_argument("--json", default=None, help="write results as JSON to this file")
    g.add_argument("--plot", default=None, help="write a PNG plot (speedup per mode, acceptance by position)")


def run(args) -> int:
    import torch

    if args.repeats is None:
        args.repeats = 30 if args.verify_cost else 2
    if args.n < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        raise MMSpecError("--n, --repeats and --max-new-tokens must be at least 1")
    batch_sizes = args.batch_size
    if args.tree_nodes is not None and args.tree_nodes < 0:
        raise MMSpecError("--tree-nodes must be >= 0")
    if args.verify_cost and (args.plot or args.modes):
        raise MMSpecError("--verify-cost times target forwards, not modes: leave out --plot and --modes",
                          param="verify_cost")
    from mmspec.outputs import check_own_file

    if args.json:
        check_own_file(args.json, "--json", "bench-json")
    if args.plot:
        check_own_file(args.plot, "--plot", "png")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, extra, recorder = _load(args)
    prompt_types = [p.strip() for p in args.prompt_types.split(",") if p.strip()]
    if set(prompt_types) - {"caption", "question"}:
        raise MMSpecError("--prompt-types takes caption and/or question")
    if args.images:
        prompts = {"caption": args.caption_prompt, "question": args.question_prompt}
        inputs = folder_inputs(args.images, args.n, {p: prompts[p] for p in prompt_types})
    elif args.target is None or args.verify_cost:   # (a forward's cost does not depend on what the image shows)
        inputs = scene_inputs(args.n, prompt_types)
    else:
        raise MMSpecError("with --target, give --images FOLDER to benchmark on")
    if args.verify_cost:
        return _verify_cost(args, pipe, inputs)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bench = Bench(pipe, modes, args.max_new_tokens, args.temperature, args.num_draft_tokens, args.lookup_tokens,
                  _other_drafters(args, pipe) if extra is None else extra, args.tree_nodes)
    if recorder is not None:   # --shaped: the oracles learn the target's answers in an untimed pass
        from mmspec.bench.shaped import record_references

        record_references(recorder, inputs, args.max_new_tokens)

    bench.time_calls(inputs, args.warmup, args.repeats)
    bench.time_to_first_token(inputs[:3])
    # throughput at each batch size: the same inputs through every mode, B rows in flight, passes interleaved
    reference = {c.input: c.ids for c in bench.results["hf-greedy"].calls}
    by_batch = {B: batched_summary(bench.time_batches(inputs, B, args.repeats), reference, inputs, args.temperature)
                for B in batch_sizes}

    report = {"machine": machine_info(str(pipe.adapter.device)),
              "config": {"target": str(args.target or "bundled"), "drafter_kind": pipe.drafter_kind,
                         "n_inputs": len(inputs), "prompt_types": prompt_types, "repeats": args.repeats,
                         "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                         "num_draft_tokens": args.num_draft_tokens, "lookup_tokens": args.lookup_tokens,
                         "batch_sizes": batch_sizes, "tree_nodes": args.tree_nodes, "shaped": args.shaped},
              "modes": summary(bench, inputs), "by_prompt_type": {},
              "batched": {str(B): rows for B, rows in by_batch.items()}}
    for ptype in prompt_types:
        report["by_prompt_type"][ptype] = summary(bench, [i for i in inputs if i.prompt_type == ptype])

    print(markdown_table(report["modes"]))
    for ptype, rows in report["by_prompt_type"].items():
        print(f"\n{ptype} prompts:\n" + markdown_table(rows))
    print("\nthroughput by batch size (all inputs, tokens/s over the whole pass):\n" + batched_table(by_batch))
    bad = [r["mode"] for r in report["modes"] if r["lossless"] is False]
    bad += [f"{r['mode']}@{B}" for B, rows in by_batch.items() for r in rows
            if r.get("lossless") is False and not r["mode"].startswith("hf-")]
    if bad:
        print(f"\nNOT LOSSLESS: {bad}")
    _write_json(args.json, report)
    if args.plot:
        plot(report["modes"], args.plot, f"mmspec bench: {report['config']['target']} on {report['machine']['cpu']}",
             report["batched"])
    return 1 if bad else 0


def _load(args) -> tuple:
    """-> (the loaded pipeline, extra ``mmspec-<name>`` pipelines or None, the recording pipeline or None):
    ``--shaped`` builds its target (and its oracle drafters), else the model flags load one."""
    from mmspec.model_flags import load_from_args, load_kwargs

    if not args.shaped:
        return load_from_args(args), None, None
    from mmspec.bench.shaped import shaped_setup
    from mmspec.drafters import weightless_kinds

    if args.target or args.images or args.temperature > 0:
        raise MMSpecError("--shaped builds its own target and times greedy decoding on the bundled world's "
                          "scenes: leave out --target, --images and --temperature", param="shaped")
    if args.drafter_kind and args.drafter_kind not in weightless_kinds():
        raise MMSpecError(f"--shaped builds a random-weight target, which no trained drafter fits: its "
                          f"--drafter-kind is one of {weightless_kinds()}", param="drafter_kind")
    pipe, extra, recorder = shaped_setup(args.shaped, args.dtype, args.replay_profile)
    if args.drafter_kind:   # e.g. layerskip: the loaded kind on the shaped target (its default skip set)
        pipe = pipe.with_drafter_kind(args.drafter_kind, drafter=load_kwargs(args)["drafter"])
    args.modes = args.modes or ("" if args.verify_cost else "hf-greedy,mmspec-none,mmspec-oracle,mmspec-replay")
    return pipe, extra, recorder


def _verify_cost(args, pipe, inputs) -> int:
    """``--verify-cost``: the forwards of one round after the first input's prompt (``verify_cost``)."""
    from mmspec.bench.verify_cost import measure, tables

    first = next((i for i in inputs if i.prompt_type == "caption"), inputs[0])
    measured = measure(pipe, first, args.verify_cost, args.batch_size, args.repeats, args.warmup)
    report = {"machine": machine_info(str(pipe.adapter.device)),
              "config": {"target": str(args.target or (f"shaped {args.shaped}" if args.shaped else "bundled")),
                         "dtype": str(pipe.target.dtype).replace("torch.", ""), "drafter_kind": pipe.drafter_kind,
                         "input": first.name, "nodes": args.verify_cost, "batch_sizes": args.batch_size,
                         "repeats": args.repeats, "warmup": args.warmup, "shaped": args.shaped},
              **measured}
    print(tables(report))
    _write_json(args.json, report)
    return 0


def _write_json(path, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))


def _other_drafters(args, pipe) -> dict:
    """``mmspec-<kind>`` pipelines timed beside the loaded one, on the same target weights and image cache: with the
    bundled target, its text, visual and eagle drafters (each unless it is the loaded kind); ``--visual-drafter``
    and ``--eagle-drafter`` name other folders, or ``none`` to skip them."""
    from mmspec.loading import (BUNDLED_EAGLE3_DRAFTER, BUNDLED_EAGLE_DRAFTER, BUNDLED_TEXT_DRAFTER,
                                BUNDLED_VISUAL_DRAFTER)

    def bundled(kind: str, folder: Path) -> Path | None:
        """the bundled target's drafter of ``kind``, unless that kind is the one loaded"""
        return folder if args.target is None and pipe.drafter_kind != kind else None

    folders = {"text": bundled("text", BUNDLED_TEXT_DRAFTER),
               "visual": _folder_flag(args.visual_drafter, bundled("visual", BUNDLED_VISUAL_DRAFTER)),
               "eagle": _folder_flag(args.eagle_drafter, bundled("eagle", BUNDLED_EAGLE_DRAFTER)
                                     if BUNDLED_EAGLE_DRAFTER.is_dir() else None),
               # a second eagle head (the EAGLE-3 one beside mmspec's first format), timed as its own mode
               "eagle3": _folder_flag(args.eagle3_drafter, BUNDLED_EAGLE3_DRAFTER
                                      if args.target is None and BUNDLED_EAGLE3_DRAFTER.is_dir() else None)}
    kinds = {"eagle3": "eagle"}   # mode name -> drafter kind, where they differ
    return {f"mmspec-{name}": pipe.with_drafter_kind(kinds.get(name, name), drafter=folder)
            for name, folder in folders.items() if folder}


def _folder_flag(value, default):
    """A drafter folder flag: ``default`` for 'default', None for 'none', else the folder given."""
    if value == "default":
        return default
    return None if str(value).lower() == "none" else value
