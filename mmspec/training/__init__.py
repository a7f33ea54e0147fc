"""``mmspec train-drafter``: distil a drafter (text, visual or eagle) from any supported target.

1. Self-distillation data: the target answers every request (an image and a prompt, several images, none, or a
   conversation) greedily; the answer ids, the target's top-K next-token distributions along the answer, and
   (visual) the pooled source features, or (eagle) the target's aux hidden states (three layers) and last hidden
   state along prompt and answer, are written to ``OUT/distill/`` in shards, so an interrupted run keeps what it
   computed.
2. Training: the drafter (and, for ``visual``, the projector that turns pooled features into ``m`` visual
   tokens) learns the target's distributions with KL or total-variation loss (DistillSpec / TVD++); an EAGLE-3
   head learns the target's next-token distribution from the target's aux hidden states (with
   training-time test, EAGLE-3; ``eagle_head``). Periodic checkpoints in ``OUT/checkpoint.pt`` and ``--resume``.
3. Export: an HF folder (weights in safetensors, tokenizer, projector) that ``mmspec.load(drafter=OUT,
   drafter_kind=...)`` takes directly -- for ``eagle`` an EAGLE-3 head vLLM and SGLang load unchanged
   (``--format``) -- then the held-out acceptance measured through the real engine. OUT is recorded as
   mmspec's own (``mmspec.outputs.claim_folder``); no other existing folder is written into.

Rooms: ``data`` (step 1), ``loop`` (the training loop of step 2), ``causal_lm`` and ``eagle_head`` (what step 2
trains for each kind), ``export`` (step 3); this file is the subcommand (its flags, and a run through the steps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmspec.errors import MMSpecError
from mmspec.model_flags import add_model_flags, load_kwargs
from mmspec.training.causal_lm import train_causal_lm
from mmspec.training.data import ROW_FORMATS, build_distill_data, read_examples
# (ttt_mask too: tests/test_eagle.py imports it from here)
from mmspec.training.eagle_head import eagle_example, train_eagle, ttt_mask  # noqa: F401
from mmspec.training.export import evaluate, export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    g = parser.add_argument_group("training")
    g.add_argument("--kind", choices=("text", "visual", "eagle"), default="visual",
                   help="drafter kind to train: a text LM, a text LM fed compressed visual tokens, or an eagle head "
                        "over the target's hidden states")
    g.add_argument("--out", required=True, help="output folder (HF format; also holds data and checkpoints)")
    g.add_argument("--data", default=None,
                   help="a folder of images (asked each --prompt), or a JSONL file, one request a line: "
                        f"{ROW_FORMATS}. Relative image paths are relative to the JSONL's folder; the target's "
                        "greedy answer to the whole request is what the drafter learns. A malformed row stops the "
                        "run before anything is written, naming its line; a row whose images cannot be read is "
                        "skipped (default: the bundled synthetic world)")
    g.add_argument("--prompt", action="append", default=None, help="prompt(s) for a folder of images "
                                                                   "(default: 'Describe the image.')")
    g.add_argument("--scenes", type=int, default=1500, help="training scenes for the bundled world")
    g.add_argument("--heldout", type=int, default=100, help="held-out examples for the acceptance report")
    g.add_argument("--init-drafter", default=None, help="start from this causal LM (default: the bundled text "
                                                        "drafter for the bundled target, else a new small Llama)")
    g.add_argument("--hidden-size", type=int, default=128, help="hidden size of a new drafter")
    g.add_argument("--num-layers", type=int, default=1, help="layers of a new drafter")
    g.add_argument("--num-visual-tokens", type=int, default=4, help="m compressed visual tokens (visual kind)")
    g.add_argument("--visual-source", choices=("target", "open_clip"), default="target",
                   help="visual tokens from the target's cached features or from an open_clip encoder")
    g.add_argument("--open-clip-model", default="ViT-B-32", help="open_clip model name (--visual-source open_clip)")
    g.add_argument("--open-clip-pretrained", default=None,
                   help="open_clip pretrained tag (needs a hub) or local checkpoint path")
    g.add_argument("--top-k", type=int, default=32, help="target probabilities kept per position")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--steps", type=int, default=600)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--loss", choices=("kl", "tvd"), default="kl")
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt and OUT/distill/")
    g.add_argument("--save-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    e = parser.add_argument_group("eagle head (--kind eagle)")
    e.add_argument("--ttt-steps", type=int, default=2,
                   help="extra unrolled steps on the head's own predictions (training-time test; 0 = true "
                        "features only)")
    e.add_argument("--draft-vocab", type=int, default=0,
                   help="VocabTrim: draft only over the N tokens the target emits most (0 = the whole vocabulary)")
    e.add_argument("--stop-threshold", type=float, default=0.0,
                   help="end a row's draft before a token the head gives less probability than this (0 = never)")
    e.add_argument("--eagle-intermediate-size", type=int, default=None,
                   help="MLP width of the head's layer (default: the target's)")
    e.add_argument("--eagle-aux-layers", default=None, metavar="I,J,K",
                   help="the three target layers the head reads, as HF hidden_states indices in [1, N-1] (the input "
                        "of layer i; what vLLM's eagle_aux_hidden_state_layer_ids means); default 2,N/2,N-3")
    e.add_argument("--format", choices=("specforge", "speculators"), default="specforge",
                   help="layout of the EAGLE-3 head written: SpecForge/vLLM (vLLM and SGLang load it) or "
                        "vllm-project/speculators (vLLM)")
    g.add_argument("--seed", type=int, default=0)


INTERRUPT_HINT = "what was computed is kept in --out: run the same command again with --resume to continue"


def run(args) -> int:
    """Refuse bad flags, an --out mmspec did not write and bad --data rows before anything is written; a run that
    stops before it computed anything leaves no folder behind."""
    import shutil

    from mmspec.outputs import MARKER, check_own_folder, claim_folder

    out = Path(args.out)
    # a folder train-drafter wrote (to resume or redo) or a new one; never a folder of the user's own files
    check_own_folder(out, "--out")
    created = not out.exists()
    try:
        claim_folder(out, "mmspec train-drafter")
        return _run(args, out)
    except BaseException:
        if created and not any(p.is_file() and p.name != MARKER for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)   # this run did no work: nothing to resume, nothing left
        raise


def _run(args, out: Path) -> int:
    import torch

    import mmspec

    if args.steps < 1 or args.batch_size < 1 or args.num_visual_tokens < 1 or args.heldout < 1:
        raise MMSpecError("--steps, --batch-size, --num-visual-tokens and --heldout must be at least 1")
    if args.ttt_steps < 0 or args.draft_vocab < 0 or not 0.0 <= args.stop_threshold < 1.0:
        raise MMSpecError("--ttt-steps and --draft-vocab must be >= 0 and --stop-threshold in [0, 1)")
    args.prompt = args.prompt or ["Describe the image."]
    torch.manual_seed(args.seed)
    train_ex, held_ex = read_examples(args)   # every --data row checked before the target loads
    # The target answers through mmspec itself (lossless, so the answers are the target's greedy ones, only
    # sooner); --drafter/--drafter-kind pick the helper drafter (kinds text, ngram and none; another kind counts
    # as not given), by default the bundled target's own default drafter, or ngram with another target.
    kind = args.drafter_kind if args.drafter_kind in (None, "text", "ngram", "none") else None
    pipe = mmspec.load(**dict(load_kwargs(args), drafter_kind=kind))
    if args.kind == "eagle":
        from mmspec.training.eagle_head import aux_ids_for

        aux_ids_for(pipe.adapter, args.eagle_aux_layers)   # a target too shallow for EAGLE-3 is refused before the data is computed
    m = args.num_visual_tokens if args.kind == "visual" else None
    t0 = time.time()
    # the distilled data depends on what it holds: the visual source and m, or the eagle head's aux layers
    eagle_data = "eagle" + (f"-aux{args.eagle_aux_layers.replace(',', '-')}" if args.eagle_aux_layers else "")
    data_dir = out / "distill" / (f"{args.visual_source}-m{m}" if m else eagle_data if args.kind == "eagle" else "text")
    rows = build_distill_data(pipe, train_ex, data_dir, args, m, "target answers (self-distillation)",
                              make_row=eagle_example if args.kind == "eagle" else None)
    if not rows:
        raise MMSpecError("no usable training examples (every image failed to load)")
    if args.kind == "eagle":
        drafter, projector = train_eagle(args, pipe, rows, out), None
    else:
        drafter, projector = train_causal_lm(args, pipe, rows, out)
    export(drafter, projector, pipe, out, args.save_dtype, args.format)
    report = evaluate(pipe, out, args.kind, held_ex, args.max_new_tokens)
    if args.kind == "eagle" and report["examples"] and report["acceptance_rate"] > 0:
        from mmspec.drafters.eagle import record_acceptance

        record_acceptance(out, report["acceptance_rate"])   # the head's own prior for the draft-length policy
    report.update(kind=args.kind, train_examples=len(rows), steps=args.steps, minutes=round((time.time() - t0) / 60, 1))
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0
