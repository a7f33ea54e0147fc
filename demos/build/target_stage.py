"""Stages 2 and 3, ``train-target`` and ``tune-questions``: projector + decoder on the frozen tower's features
(stage 3: a question-heavy mix, per-answer loss and the pointer loss that shows heads where to look)."""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from demos.build.common import (
    PromptCache, build_pool, build_processor, forced_greedy, format_scores, heldout_examples, sample_batch, score,
    set_generation_config, target_config,
)
from demos.build.vision_stage import image_features
from vision import scenes

def length_chunks(ids, mask, labels, j, per_example: bool):
    """Split a batch in two by length, each part cut to its own longest row (right padding): captions are
    about twice as long as questions, so one batch padded to its longest row spends much of a step on padding.

    Returns ``(ids, mask, labels, j, share)`` per part; ``share`` is the part's weight in the batch loss (its
    share of the answers for the per-example loss, of the answer tokens for the token-averaged one), so the
    parts' weighted losses, and gradients, add up to the whole batch's.
    """
    lens = mask.sum(1)
    cut = (lens.min() + lens.max()) / 2
    n_answer = int((labels != -100).sum())
    out = []
    for rows in ((lens <= cut).nonzero().flatten(), (lens > cut).nonzero().flatten()):
        if len(rows):
            n = int(lens[rows].max())
            part_labels = labels[rows, :n]
            share = len(rows) / len(ids) if per_example else int((part_labels != -100).sum()) / n_answer
            out.append((ids[rows, :n], mask[rows, :n], part_labels, j[rows], share))
    return out


@torch.no_grad()
def pool_features(tower, pool, batch: int = 250) -> torch.Tensor:
    """Image features of every pool scene, computed once: the tower is frozen while the decoder trains."""
    out = []
    for i in tqdm(range(0, len(pool["seeds"]), batch), desc="image features", mininterval=5):
        out.append(image_features(tower, pool["pixels"][i:i + batch].float()))
    return torch.cat(out)


def answer_loss(model, ids, mask, labels, feats, per_example: bool = False, pointers=None):
    """LLaVA's loss with precomputed image features spliced in (its own forward recomputes the tower).

    ``per_example``: average each answer's tokens first, then the answers, so a one-word answer weighs
    as much as a 40-token caption (LLaVA's own loss averages all tokens: captions take ~90% of it).
    With ``pointers`` (from :func:`pointer_targets`) returns ``(loss, pointer loss)``, else the loss.
    """
    emb = model.get_input_embeddings()(ids)
    img = model.model.multi_modal_projector(feats).to(emb.dtype)
    slots = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(emb)
    emb = emb.masked_scatter(slots, img)
    out = model.model.language_model(inputs_embeds=emb, attention_mask=mask, output_attentions=pointers is not None)
    h = out.last_hidden_state
    tgt = labels[:, 1:]
    keep = tgt != -100
    if not per_example:
        loss = torch.nn.functional.cross_entropy(model.lm_head(h[:, :-1][keep]), tgt[keep])
    else:
        tok_loss = torch.zeros(tgt.shape, dtype=h.dtype, device=h.device)
        tok_loss[keep] = torch.nn.functional.cross_entropy(model.lm_head(h[:, :-1][keep]), tgt[keep],
                                                           reduction="none")
        loss = (tok_loss.sum(1) / keep.sum(1).clamp(min=1)).mean()
    if pointers is None:
        return loss
    return loss, pointer_loss(out.attentions, pointers)


# Stage 3's pointer supervision: one head is told which image token a question's object is in. Without it
# the decoder sits on a plateau for questions that must find an object by its content (the CLIP features
# support the lookup: a one-layer attention probe learns it at once, but the two-step circuit
# "read the noun, then find its cell" has no gradient until both steps exist).
POINTER_HEADS = {"noun": (3, 0), "answer": (8, 0), "prev": (1, 0)}  # (layer, head)


def pointer_targets(ids, labels, seeds, tok, image_token_id, prev: bool = False):
    """Where one head should look: ``{"noun": [(row, query position, key position)], "answer": [...]}``.

    ``noun``: the object word of a question (the shape in "What color is the circle?", "Where is the red
    square?", "Is there a blue star?") -> the image token of that object's grid cell. ``answer``: every position
    that predicts an answer word of such a question -> the same image token. Questions whose object is absent
    ("no") point at BOS instead; questions whose object is not unique, captions and counts get none.
    ``prev`` (with ``prev=True``): the object word of a question that names a colour -> the colour word
    before it, the first step of the lookup: the noun head can match colour and shape only once the colour
    has been moved onto the noun.
    """
    shape_of = {tok.convert_tokens_to_ids(x): x for x in scenes.SHAPES}
    color_of = {tok.convert_tokens_to_ids(x): x for x in scenes.COLORS}
    out = {"noun": [], "answer": [], "prev": []}
    for r in range(ids.shape[0]):
        row = ids[r].tolist()
        plen = int((labels[r] != -100).nonzero()[0])  # the answer starts here (right padding is -100 too)
        nouns = [p for p in range(plen) if row[p] in shape_of]
        if not nouns:
            continue
        p = nouns[-1]
        shape, color = shape_of[row[p]], color_of.get(row[p - 1])
        hits = [o for o in scenes.scene_for_seed(seeds[r]).objects
                if o.shape == shape and (color is None or o.color == color)]
        if len(hits) > 1:
            continue
        # no such object ("Is there a blue star?" -> "no"): look at BOS, the place a head rests when nothing
        # matches, so "an image token matched" is what tells yes from no
        cell_pos = [q for q, t in enumerate(row) if t == image_token_id][hits[0].cell] if hits else 0
        out["noun"].append((r, p, cell_pos))
        if prev and color is not None:
            out["prev"].append((r, p, p - 1))
        n_words = int((labels[r] != -100).sum()) - 1  # answer words, without the EOS
        out["answer"] += [(r, plen - 1 + i, cell_pos) for i in range(n_words)]
    return out


def pointer_loss(attentions, targets) -> torch.Tensor:
    """Mean -log attention weight of each supervised head on its target image token."""
    terms = []
    for name, (layer, head) in POINTER_HEADS.items():
        if targets.get(name):
            r, q, k = (torch.tensor(x) for x in zip(*targets[name]))
            terms.append(-torch.log(attentions[layer][r, head, q, k] + 1e-6).mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())


def param_groups(model, lookup_lr_mult: float = 1.0) -> list[dict]:
    """The decoder's trainable parameters as optimizer groups, each with its ``lr_mult``.

    With ``lookup_lr_mult != 1`` the attention layers of the pointer heads get their own group: the colour
    part of the lookup is a product of three matrices (the prev head's values, the noun head's query and
    key), so its gradient stays small while all three are.  One group otherwise, so that checkpoints of
    runs without it resume as they were saved.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if lookup_lr_mult == 1.0:
        return [{"params": trainable, "lr_mult": 1.0}]
    lookup = tuple(f"language_model.layers.{layer}.self_attn." for layer, _ in POINTER_HEADS.values())
    fast = {id(p) for n, p in model.named_parameters() if p.requires_grad and any(x in n for x in lookup)}
    return [{"params": [p for p in trainable if id(p) not in fast], "lr_mult": 1.0},
            {"params": [p for p in trainable if id(p) in fast], "lr_mult": lookup_lr_mult}]


def cmd_train_target(args):
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    vision_ckpt = Path(args.vision) if args.vision else work / "vision_tower.pt"
    if not vision_ckpt.exists():
        raise SystemExit(f"no trained vision tower at {vision_ckpt}: run the train-vision step first")
    questions = args.cmd == "tune-questions"
    ckpt = work / ("questions_ckpt.pt" if questions else "target_ckpt.pt")
    start = None  # stage 3 begins from stage 2's weights unless it resumes its own checkpoint
    if questions and not (args.resume and ckpt.exists()):
        start = Path(args.init_from) if args.init_from else work / "target_ckpt.pt"
        if not start.exists():  # before the minutes of pool rendering and feature extraction
            raise SystemExit(f"no stage-2 checkpoint at {start}: run train-target first")
    processor = build_processor()
    tok = processor.tokenizer
    pointing = args.pointer_weight > 0
    cfg = target_config(tok)
    if pointing:  # the pointer loss reads attention weights: only the eager implementation returns them
        cfg.text_config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg)
    set_generation_config(model, tok)
    model.model.vision_tower.load_state_dict(torch.load(vision_ckpt))
    model.model.vision_tower.requires_grad_(False)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"target parameters: {nparam / 1e6:.2f}M (vision tower frozen, from {vision_ckpt})", flush=True)
    pool = build_pool(processor, args.pool, work / f"pool_{args.pool}.pt")
    feats = pool_features(model.model.vision_tower.eval(), pool)
    cache = PromptCache(processor)

    groups = param_groups(model, args.lookup_lr_mult if pointing else 1.0)
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    step = 0
    t0 = time.time()
    prev_elapsed = 0.0  # training seconds spent before this (resumed) run
    rng = random.Random(args.seed)
    log = open(work / ("questions_log.txt" if questions else "target_log.txt"), "a")
    if start is not None:
        model.load_state_dict(torch.load(start, weights_only=False)["model"])
        print(f"stage 3 starts from the weights in {start} (fresh optimizer and schedule)", flush=True)
    if args.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        prev_elapsed = st.get("elapsed", 0.0)
        print(f"resumed from step {step} ({prev_elapsed / 60:.1f} min trained)", flush=True)

    # The spliced forward must be LLaVA's own: check once on a real batch.
    ids, mask, labels, j = sample_batch(pool, cache, random.Random(-1), 4)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pool["pixels"][j].float(), labels=labels).loss
        ours = answer_loss(model, ids, mask, labels, feats[j])
    assert torch.allclose(ref, ours, atol=1e-4), (ref.item(), ours.item())

    def progress(s):
        p = (s - args.warmup) / max(1, args.steps - args.warmup)
        if args.max_minutes:  # time-based schedule: anneal within the wall-clock budget
            p = max(p, (prev_elapsed + time.time() - t0) / (60 * args.max_minutes))
        return min(1.0, max(0.0, p))

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress(s))))

    def save():
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                    "elapsed": prev_elapsed + time.time() - t0}, tmp)
        os.replace(tmp, ckpt)

    def quick_eval():
        model.eval()
        exs = heldout_examples(20, start=900)
        per = score(exs, [c[2] and e.answer or "" for e, c in zip(exs, forced_greedy(model, processor, exs))])
        msg = f"step {step} held-out scenes 900..919, greedy (forced):\n{format_scores(per)}"
        tqdm.write(msg)
        log.write(msg + "\n")
        log.flush()
        model.train()

    model.train()
    model.model.vision_tower.eval()
    ema = aux_ema = None
    bar = tqdm(total=args.steps, initial=step, desc="tune questions" if questions else "train target", mininterval=5)
    while step < args.steps:
        if step >= args.warmup and progress(step) >= 1.0:
            tqdm.write(f"schedule finished (time budget) at step {step}")
            break
        batch = sample_batch(pool, cache, rng, args.batch, kind_weights=args.kind_weights)
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["lr_mult"]
        opt.zero_grad(set_to_none=True)
        total = aux_total = 0.0
        for ids, mask, labels, j, share in length_chunks(*batch, per_example=questions):
            if pointing:
                ptr = pointer_targets(ids, labels, [pool["seeds"][i] for i in j.tolist()], tok,
                                      model.config.image_token_id, prev=args.prev_pointer)
                loss, aux = answer_loss(model, ids, mask, labels, feats[j], per_example=questions, pointers=ptr)
                aux_total += share * aux.item()
                loss = loss + args.pointer_weight * aux
            else:
                loss = answer_loss(model, ids, mask, labels, feats[j], per_example=questions)
            (share * loss).backward()
            total += share * loss.item()
        if pointing:
            aux_ema = aux_total if aux_ema is None else 0.98 * aux_ema + 0.02 * aux_total
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        ema = total if ema is None else 0.98 * ema + 0.02 * total
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_at(step):.1e}")
        if step % 50 == 0:
            ptr_msg = f" pointer {aux_ema:.3f}" if aux_ema is not None else ""
            log.write(f"step {step} loss {ema:.4f}{ptr_msg} lr {lr_at(step):.2e} "
                      f"elapsed {prev_elapsed + time.time() - t0:.0f}s\n")
            log.flush()
        if step % args.ckpt_every == 0 or step == args.steps:
            save()
        if args.eval_every and step % args.eval_every == 0:
            quick_eval()
    bar.close()
    save()
    quick_eval()
    model.eval()
    final = work / "target_fp32"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    print(f"saved {final} after {step} steps, {(time.time() - t0) / 60:.1f} min", flush=True)
