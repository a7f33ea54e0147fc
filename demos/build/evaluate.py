"""``eval`` and ``look``: what the target answers on held-out scenes, how much of it a drafter gets accepted
through the real engine, and where the lookup head looks.  Both load their models with ``mmspec.load``.
(Speed is ``mmspec bench``'s: the ``all`` stage ends with it.)"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch

import mmspec
from demos.build.common import (
    MODELS, PromptCache, chat_prompt, forced_greedy, format_scores, heldout_examples, pad_batch, score,
)
from demos.build.target_stage import POINTER_HEADS
from vision.scenes import is_correct


@torch.no_grad()
def generate_answers(model, processor, examples, batch_size=32, max_new_tokens=48):
    """Greedy answers (decoded text) of a LLaVA model for examples, batched with left padding."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    outs = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        texts = [chat_prompt(processor, e.prompt) for e in chunk]
        inputs = processor(images=[e.image for e in chunk], text=texts, return_tensors="pt", padding=True)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[:, inputs["input_ids"].shape[1]:]
        outs += tok.batch_decode(new, skip_special_tokens=True)
    return outs


def drafter_acceptance(pipe, kind: str, folder: Path, examples, max_new_tokens: int = 48) -> dict[str, dict]:
    """Accepted tokens per target forward of a drafter, through the engine (``mmspec train-drafter``'s held-out
    report: each output also checked against the target's), for captions and for questions."""
    from mmspec.training import evaluate

    groups = {"caption": [e for e in examples if e.kind == "caption"],
              "questions": [e for e in examples if e.kind != "caption"]}
    return {g: evaluate(pipe, folder, kind, exs, max_new_tokens) for g, exs in groups.items() if exs}


def cmd_eval(args):
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = mmspec.load(target=args.target, drafter=None, drafter_kind="none")  # the target alone
    model, processor = pipe.target, pipe.processor
    exs = heldout_examples(args.n, start=args.start)
    if args.method == "generate":
        answers = generate_answers(model, processor, exs)
    else:  # exact teacher-forced greedy check: a miss is scored wrong without generating it
        checked = forced_greedy(model, processor, exs)
        answers = [e.answer if ok else "<wrong>" for e, (_, _, ok, _) in zip(exs, checked)]
        if args.show_errors:
            bad = [e for e, a in zip(exs, answers) if a == "<wrong>"]
            fixed = iter(generate_answers(model, processor, bad))
            answers = [a if a != "<wrong>" else next(fixed) for a in answers]
    per = score(exs, answers)
    print(f"held-out scenes {args.start}..{args.start + args.n - 1} ({len(exs)} prompts), greedy "
          f"({args.method}), target {args.target or MODELS / 'target'}")
    print(format_scores(per))
    if args.show_errors:
        for e, a in zip(exs, answers):
            if not is_correct(a, e):
                print(f"  seed {e.seed} {e.kind}: {e.prompt!r} -> {a!r} (truth {e.answer!r})")
    if args.acceptance:
        folder = Path(args.drafter) if args.drafter else MODELS / f"{args.drafter_kind}-drafter"
        acc = drafter_acceptance(pipe, args.drafter_kind, folder, heldout_examples(args.acceptance, start=args.start))
        print(f"{args.drafter_kind} drafter {folder} through mmspec (adaptive k), held-out scenes {args.start}.."
              f"{args.start + args.acceptance - 1}:")
        for group, a in acc.items():
            print(f"  {group:<9} {a['examples']:4d} prompts: mean accepted {a['mean_accepted']:.3f} tokens per target "
                  f"forward, acceptance rate {a['acceptance_rate']:.3f}, outputs differing from the target "
                  f"{a['outputs_differing_from_target']}")
    print(f"({time.time() - t0:.0f}s)")


LOOK_PLACES = ("both match", "same shape", "same colour", "other object", "empty cell", "BOS", "text")


@torch.no_grad()
def noun_head_looks(model, processor, examples, batch_size=50):
    """Where the noun pointer head looks from a question's object word: ``{group: {place: mean weight}}``.

    Groups: ``position``, ``yesno-yes``, ``yesno-no``. Places: the image token of the object the question names
    (``both match``), of an object with only its shape or only its colour, of any other object, of an empty
    cell, BOS (where an absent object should send it), or the text.  The model must return attention
    weights (eager attention).
    """
    tok = processor.tokenizer
    cache = PromptCache(processor)
    layer, head = POINTER_HEADS["noun"]
    sums = defaultdict(lambda: dict.fromkeys(LOOK_PLACES, 0.0))
    counts = defaultdict(int)
    examples = [e for e in examples if e.kind in ("position", "yesno")]
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        pids = [cache.prompt_ids(e.prompt) for e in chunk]
        ids, mask, _ = pad_batch(pids, [[] for _ in chunk], tok.pad_token_id)
        pix = processor.image_processor(images=[e.image for e in chunk], return_tensors="pt")["pixel_values"]
        att = model(input_ids=ids, attention_mask=mask, pixel_values=pix, output_attentions=True).attentions[layer]
        for r, e in enumerate(chunk):
            color, shape = e.prompt.rstrip("?").split()[-2:]
            p = len(pids[r]) - 1 - pids[r][::-1].index(tok.convert_tokens_to_ids(shape))
            w = att[r, head, p]
            cells = {o.cell: o for o in e.scene.objects}
            group = "position" if e.kind == "position" else f"yesno-{e.answer}"
            counts[group] += 1
            img = (ids[r] == model.config.image_token_id).nonzero().flatten().tolist()
            for c, q in enumerate(img):
                o = cells.get(c)
                place = ("empty cell" if o is None else "both match" if (o.color, o.shape) == (color, shape)
                         else "same shape" if o.shape == shape else "same colour" if o.color == color
                         else "other object")
                sums[group][place] += w[q].item()
            sums[group]["BOS"] += w[0].item()
            sums[group]["text"] += w[1:p + 1].sum().item() - w[img].sum().item()
    return {g: {k: v / counts[g] for k, v in sums[g].items()} for g in sorted(sums)}


def cmd_look(args):
    torch.set_num_threads(args.threads)
    pipe = mmspec.load(target=args.target, drafter=None, drafter_kind="none")  # the target alone
    model, processor = pipe.target, pipe.processor
    model.set_attn_implementation("eager")  # the attention weights are what this reads
    looks = noun_head_looks(model, processor, heldout_examples(args.n, start=args.start))
    layer, head = POINTER_HEADS["noun"]
    print(f"where the noun head (layer {layer}, head {head}) looks from the question's object word, mean "
          f"attention weight, held-out scenes {args.start}..{args.start + args.n - 1}, target "
          f"{args.target or MODELS / 'target'}")
    print(f"  {'question':<10}" + "".join(f"{k:>13}" for k in LOOK_PLACES))
    for group, w in looks.items():
        print(f"  {group:<10}" + "".join(f"{w[k]:13.2f}" for k in LOOK_PLACES))
