"""The drafter stages, ``distill-drafter`` (text), ``distill-visual`` and ``distill-eagle``: each runs the
engine's own trainer, ``mmspec train-drafter --kind KIND``, with the settings the model card records, into
``WORKDIR/KIND-drafter`` (``export --what ...`` then copies it into assets/models).

``mmspec train-drafter`` distils from the target in ``assets/models/target`` (the bundled one): export the
target first.  The target answers through mmspec with the weightless ``ngram`` drafter (lossless, so these
are its own greedy answers), so nothing depends on the drafters being rebuilt.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from demos.build.common import build_tokenizer, set_generation_config


def drafter_config(tok):
    """The bundled text drafter's shape: one Llama layer of 128, 4 heads, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )


def new_text_drafter(folder: Path, seed: int) -> Path:
    """A freshly initialised text drafter of the bundled shape, saved where ``--init-drafter`` can read it
    (train-drafter's own new drafter has another head count, and its default starts from the shipped one)."""
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(drafter_config(tok))
    set_generation_config(model, tok)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# a distill stage's folder in the workdir (export copies it under the same name): the eagle kind trains EAGLE-3 heads
KIND_FOLDERS = {"text": "text-drafter", "visual": "visual-drafter", "eagle": "eagle3-drafter"}


def train_drafter_argv(args, init: Path | None = None) -> list[str]:
    """The ``mmspec train-drafter`` command line of a distill stage (``args.kind``: text, visual or eagle)."""
    out = Path(args.out) if args.out else Path(args.workdir) / KIND_FOLDERS[args.kind]
    argv = ["train-drafter", "--kind", args.kind, "--out", str(out), "--drafter", "none", "--drafter-kind", "ngram",
            "--scenes", str(args.scenes), "--heldout", str(args.heldout), "--steps", str(args.steps),
            "--batch-size", str(args.batch), "--lr", str(args.lr), "--max-new-tokens", str(args.max_new_tokens),
            "--seed", str(args.seed)]
    if init is not None:
        argv += ["--init-drafter", str(init)]
    if args.kind == "visual":
        argv += ["--num-visual-tokens", str(args.num_visual_tokens)]
    if args.kind == "eagle":  # the EAGLE-3 head's recipe: two unrolled steps on its own predictions, MLP 384, float32
        argv += ["--ttt-steps", "2", "--eagle-intermediate-size", "384", "--eagle-aux-layers", "2,8,15",
                 "--save-dtype", "float32"]
    return argv + shlex.split(args.train_drafter_flags)


def cmd_distill(args):
    from mmspec.cli import main as mmspec_main

    torch.set_num_threads(args.threads)
    init = None
    if args.kind == "text":  # from scratch, in the bundled shape (the visual drafter starts from the text one)
        init = new_text_drafter(Path(args.workdir) / "text-drafter-init", args.seed)
    argv = train_drafter_argv(args, init)
    print("mmspec " + shlex.join(argv), flush=True)
    status = mmspec_main(argv)
    if status:
        raise SystemExit(f"mmspec train-drafter --kind {args.kind} failed (exit status {status})")
