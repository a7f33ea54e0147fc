"""Build, train, export and evaluate the bundled default models (target, text, visual and eagle drafters).

The models know only the synthetic scene world of :mod:`vision.scenes`.

    python -m demos.build_default_models all            # everything from scratch, ~55 min of training on
                                                        # 2 cores; exports over assets/models
    python -m demos.build_default_models train-vision   # stage 1: the CLIP tower learns to see the grid
    python -m demos.build_default_models train-target   # stage 2: projector + decoder (add --resume to continue)
    python -m demos.build_default_models tune-questions # stage 3: mostly questions, heads shown where to look
    python -m demos.build_default_models export --what target
    python -m demos.build_default_models distill-drafter   # mmspec train-drafter --kind text
    python -m demos.build_default_models distill-visual    # mmspec train-drafter --kind visual
    python -m demos.build_default_models distill-eagle     # mmspec train-drafter --kind eagle
    python -m demos.build_default_models export         # the drafters too
    python -m demos.build_default_models eval --n 200 --acceptance 50
    python -m demos.build_default_models look           # where the lookup head looks on held-out questions
    mmspec bench                                        # speed: the engine's benchmark

Nothing is downloaded: tokenizer, processor and target are built from configs.
Scratch output (checkpoints, pools, trained drafters) goes to ``runs/`` (see --workdir).
"""

from __future__ import annotations

import argparse
import shlex

from demos.build import drafter_stage, evaluate, export, target_stage, vision_stage
from demos.build.common import KIND_WEIGHTS, QUESTION_WEIGHTS, ROOT
from mmspec.argtypes import positive_float
from vision.scenes import KINDS


def _training_args(p, *, steps, batch, lr, warmup, eval_every):
    """Flags every training stage takes (defaults: the bundled models' settings for stages 1 and 2; stage 3's
    bundled run was made in three parts, see assets/models/README.md)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--pool", type=int, default=10000, help="pre-rendered training scenes")
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")


def kind_weights_arg(text: str) -> dict[str, float]:
    """``caption=.2,yesno=.4,...`` -> how often each prompt kind is drawn (kinds left out: never)."""
    out = {}
    for part in text.split(","):
        kind, _, w = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown prompt kind {kind!r} (kinds: {', '.join(KINDS)})")
        try:
            out[kind] = float(w)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not KIND=WEIGHT") from None
        if out[kind] < 0:
            raise argparse.ArgumentTypeError(f"negative weight in {part!r}")
    if not sum(out.values()) > 0:
        raise argparse.ArgumentTypeError("the weights must not all be 0")
    return out


def _decoder_args(p, *, max_minutes, pointer_weight, kind_weights, prev_pointer=False, lookup_lr_mult=1.0):
    """Flags of the two decoder stages (train-target, tune-questions)."""
    p.add_argument("--kind-weights", type=kind_weights_arg, default=kind_weights,
                   help="how often each prompt kind is drawn, KIND=WEIGHT,... (default: "
                        + ",".join(f"{k}={w:g}" for k, w in kind_weights.items()) + ")")
    p.add_argument("--max-minutes", type=float, default=max_minutes,
                   help="total training wall-clock budget incl. resumed runs; the lr schedule anneals within it (0: off)")
    p.add_argument("--vision", default=None, help="trained vision tower (default: WORKDIR/vision_tower.pt)")
    p.add_argument("--pointer-weight", type=float, default=pointer_weight,
                   help="weight of the loss that shows heads where a question's object is: its image token, or BOS "
                        "if absent (0: off)")
    p.add_argument("--lookup-lr-mult", type=positive_float, default=lookup_lr_mult,
                   help="with the pointer loss, the learning rate of the pointer heads' attention layers is this "
                        "many times the rest's")
    p.add_argument("--prev-pointer", action=argparse.BooleanOptionalAction, default=prev_pointer,
                   help="with the pointer loss, also show a layer-1 head the colour word before a question's noun")


def _distill_args(p, *, kind, scenes, heldout, steps, batch, lr, max_new_tokens=48):
    """Flags of a drafter stage: the ``mmspec train-drafter`` settings the model card records (the rest pass
    through ``--train-drafter-flags``)."""
    p.add_argument("--scenes", type=int, default=scenes,
                   help="training scenes of the bundled world, each asked for a caption and one question")
    p.add_argument("--heldout", type=int, default=heldout, help="held-out scenes of train-drafter's report")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch, help="train-drafter --batch-size")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="longest target answer")
    p.add_argument("--out", default=None, help=f"output folder (default: WORKDIR/{drafter_stage.KIND_FOLDERS[kind]})")
    p.add_argument("--train-drafter-flags", default="", metavar="FLAGS",
                   help="more mmspec train-drafter flags, in one string (e.g. --train-drafter-flags=\"--resume --loss tvd\")")
    p.set_defaults(fn=drafter_stage.cmd_distill, kind=kind)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m demos.build_default_models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "default_models"), help="scratch folder")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train-vision", help="stage 1: train the CLIP tower to classify every grid cell (CPU)")
    _training_args(p, steps=400, batch=128, lr=1e-3, warmup=50, eval_every=100)
    p.add_argument("--val", type=int, default=100, help="held-out scenes for the cell accuracy (seeds 900+)")
    p.set_defaults(fn=vision_stage.cmd_train_vision)

    p = sub.add_parser("train-target", help="stage 2: train projector + decoder on the frozen tower (CPU)")
    _training_args(p, steps=4000, batch=32, lr=1.5e-3, warmup=100, eval_every=250)
    _decoder_args(p, max_minutes=25, pointer_weight=0.0, kind_weights=KIND_WEIGHTS)
    p.set_defaults(fn=target_stage.cmd_train_target)

    p = sub.add_parser("tune-questions",
                       help="stage 3: continue the stage-2 target with mostly questions, each answer weighted "
                            "equally (CPU)")
    _training_args(p, steps=4000, batch=32, lr=1.2e-3, warmup=50, eval_every=250)
    _decoder_args(p, max_minutes=25, pointer_weight=4.0, kind_weights=QUESTION_WEIGHTS, prev_pointer=True,
                  lookup_lr_mult=5.0)
    p.add_argument("--init-from", default=None,
                   help="stage-2 checkpoint to start from (default: WORKDIR/target_ckpt.pt)")
    p.set_defaults(fn=target_stage.cmd_train_target)

    p = sub.add_parser("export", help="write trained models to assets/models (target: 16-bit safetensors; "
                                      "drafters: as train-drafter saved them)")
    p.add_argument("--what", choices=["all", "target", *export.DRAFTER_FOLDERS], default="all",
                   help="drafter: the text drafter")
    p.set_defaults(fn=export.cmd_export)

    p = sub.add_parser("distill-drafter", help="the text drafter, from scratch: mmspec train-drafter --kind text "
                                               "on the bundled target's greedy answers")
    _distill_args(p, kind="text", scenes=60, heldout=100, steps=400, batch=64, lr=3e-3)

    p = sub.add_parser("distill-visual", help="the visual drafter, from the bundled text drafter: mmspec "
                                              "train-drafter --kind visual")
    _distill_args(p, kind="visual", scenes=250, heldout=100, steps=400, batch=16, lr=2e-3)
    p.add_argument("--num-visual-tokens", type=int, default=4, help="pooled image tokens the drafter reads")

    p = sub.add_parser("distill-eagle", help="the eagle head over the bundled target's hidden states: mmspec "
                                             "train-drafter --kind eagle")
    _distill_args(p, kind="eagle", scenes=600, heldout=100, steps=2000, batch=16, lr=2e-3, max_new_tokens=64)

    p = sub.add_parser("look", help="where the noun pointer head looks on held-out position and yes/no "
                                    "questions (right object, same shape, same colour, BOS...)")
    p.add_argument("--n", type=int, default=200, help="held-out scenes")
    p.add_argument("--start", type=int, default=0, help="first held-out scene seed")
    p.add_argument("--target", default=None, help="target folder (default: bundled)")
    p.set_defaults(fn=evaluate.cmd_look)

    p = sub.add_parser("eval", help="held-out accuracy per prompt type (and drafter acceptance)")
    p.add_argument("--n", type=int, default=200, help="held-out scenes (each asked all 5 prompt types)")
    p.add_argument("--start", type=int, default=0, help="first held-out scene seed")
    p.add_argument("--target", default=None, help="target folder (default: bundled)")
    p.add_argument("--drafter", default=None, help="drafter folder (default: the bundled one of --drafter-kind)")
    p.add_argument("--drafter-kind", choices=["text", "visual", "eagle"], default="text")
    p.add_argument("--acceptance", type=int, default=0,
                   help="also measure the drafter's acceptance through mmspec on this many scenes")
    p.add_argument("--show-errors", action="store_true")
    p.add_argument("--method", choices=["generate", "forced"], default="generate",
                   help="generate: batched model.generate (left padding); forced: exact greedy check by "
                        "teacher forcing, batch-1 generate only for the misses (much faster)")
    p.set_defaults(fn=evaluate.cmd_eval)

    p = sub.add_parser("images", help="render sample held-out scenes to assets/images")
    p.add_argument("--count", type=int, default=16)
    p.set_defaults(fn=export.cmd_images)

    p = sub.add_parser("all", help="train-vision, train-target, tune-questions, export, distill-drafter, export, "
                                   "distill-visual, export, distill-eagle, export, images, eval, then mmspec bench "
                                   "(writes over assets/models)")
    p.add_argument("--resume", action="store_true", help="continue the decoder stages from their checkpoints")
    p.add_argument("--target-minutes", type=float, default=25, help="stage 2's wall-clock budget")
    p.add_argument("--tune-minutes", type=float, default=25, help="stage 3's wall-clock budget (0: skip stage 3)")
    p.set_defaults(fn=cmd_all)
    return ap


def all_stages(args) -> list[list[str]]:
    """The command lines ``all`` runs, in order: the builder's stages with their parser defaults, then
    ``mmspec bench`` (an argv that starts with ``mmspec``)."""
    common = ["--workdir", args.workdir, "--threads", str(args.threads), "--seed", str(args.seed)]
    resume = ["--resume"] if args.resume else []
    stages = [["train-vision", *resume], ["train-target", "--max-minutes", str(args.target_minutes), *resume]]
    if args.tune_minutes > 0:
        stages.append(["tune-questions", "--max-minutes", str(args.tune_minutes), *resume])
    stages += [["export", "--what", "target"],  # the drafters learn from the exported (bundled) target
               ["distill-drafter"], ["export", "--what", "drafter"],  # the visual drafter starts from it
               ["distill-visual"], ["export", "--what", "visual-drafter"],
               ["distill-eagle"], ["export", "--what", "eagle3-drafter"],
               ["images"], ["eval", "--method", "forced", "--acceptance", "50"]]
    bench = ["mmspec", "bench", "--threads", str(args.threads), "--json", f"{args.workdir}/bench.json"]
    return [common + s for s in stages] + [bench]


def cmd_all(args):
    """The bundled models from scratch: every stage runs with its own parser defaults (``all_stages``)."""
    from mmspec.cli import main as mmspec_main

    for argv in all_stages(args):
        print(f"== {'' if argv[0] == 'mmspec' else 'python -m demos.build_default_models '}{shlex.join(argv)}",
              flush=True)
        if argv[0] == "mmspec":
            status = mmspec_main(argv[1:])
            if status:
                raise SystemExit(f"{shlex.join(argv)} failed (exit status {status})")
        else:
            stage = build_parser().parse_args(argv)
            stage.fn(stage)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.fn(args)
