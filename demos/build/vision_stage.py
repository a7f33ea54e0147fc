"""Stage 1, ``train-vision``: the CLIP tower alone learns to see the 3x3 grid (per-cell heads and codes)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from demos.build.common import N_IMAGE_TOKENS, build_pool, build_processor, target_config
from vision import scenes
from vision.scenes import DEFAULT_RENDER_SIZE

# Per-cell targets of the vision pre-training: what is in each grid cell, and which cell it is.
N_CELL_SHAPE, N_CELL_COLOR, N_CELL_SIZE = len(scenes.SHAPES) + 1, len(scenes.COLORS) + 1, len(scenes.SIZES) + 1
CELL_HEADS = (N_CELL_SHAPE, N_CELL_COLOR, N_CELL_SIZE, N_IMAGE_TOKENS)
FEATURE_SCALE = 8.0  # the trained tower's output is multiplied by this (see scale_tower_output)


def cell_codes(hidden: int, seed: int = 0, norm: float = 4.0) -> torch.Tensor:
    """Fixed random code vectors, one per value of every cell head (rows in CELL_HEADS order)."""
    c = torch.randn(sum(CELL_HEADS), hidden, generator=torch.Generator().manual_seed(seed))
    return norm * c / c.norm(dim=-1, keepdim=True)


def code_targets(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., 9, 4) cell labels -> (..., 9, hidden): the sum of the codes of a cell's four values."""
    offsets = torch.tensor([0, *CELL_HEADS[:-1]]).cumsum(0)
    return codes[labels + offsets].sum(-2)


@torch.no_grad()
def scale_tower_output(tower, factor: float) -> None:
    """Multiply the tower's hidden states by ``factor``, exactly: every LayerNorm inside is blind to the
    scale of its input, so scaling what enters the residual stream (the pre-LayerNorm's affine output and
    each block's output projections) scales every hidden state and changes nothing else."""
    m = getattr(tower, "vision_model", tower)  # CLIPVisionModel is flat in transformers 5
    for p in (m.pre_layrnorm.weight, m.pre_layrnorm.bias):
        p.mul_(factor)
    for layer in m.encoder.layers:
        for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
            lin.weight.mul_(factor)
            lin.bias.mul_(factor)


def cell_labels(seed: int) -> torch.Tensor:
    """(9, 4) long: shape, colour, size (0 = empty cell) and index of every grid cell of a scene."""
    lab = torch.zeros(N_IMAGE_TOKENS, 4, dtype=torch.long)
    lab[:, 3] = torch.arange(N_IMAGE_TOKENS)
    for o in scenes.scene_for_seed(seed).objects:
        lab[o.cell, 0] = scenes.SHAPES.index(o.shape) + 1
        lab[o.cell, 1] = list(scenes.COLORS).index(o.color) + 1
        lab[o.cell, 2] = list(scenes.SIZES).index(o.size) + 1
    return lab


def image_features(vision_tower, pixels: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds its projector (vision_feature_layer=-1, strategy "default": CLS dropped)."""
    return vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


def heldout_pixels(processor, seeds):
    imgs = [scenes.render(scenes.scene_for_seed(s), DEFAULT_RENDER_SIZE) for s in seeds]
    return processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def cell_accuracy(vision_tower, head, pixels, labels) -> dict[str, float]:
    logits = head(image_features(vision_tower, pixels)).split(CELL_HEADS, -1)
    right = torch.stack([lg.argmax(-1) == labels[..., i] for i, lg in enumerate(logits)], -1)  # (B, 9, 4)
    names = ("shape", "color", "size", "cell")
    acc = {n: right[..., i].float().mean().item() for i, n in enumerate(names)}
    acc["scene"] = right.all(-1).all(-1).float().mean().item()  # every cell of the image right
    return acc


def cmd_train_vision(args):
    """Stage 1: teach the CLIP tower to see the grid, by classifying every cell's contents.

    Trained from scratch through the language model's loss on a CPU budget, the tower's residual stream
    blew up and its features lost their differences (the decoder then answered from the text prior).
    A direct per-cell signal (shape, colour, size, which cell) makes the 9 image tokens linearly readable in
    a few minutes.  Linear heads alone were not enough: shape was readable but quiet next to "which cell"
    and "empty or not", and the decoder learned colours and places but kept guessing shapes.  So every
    token is also pulled onto a sum of fixed random codes, one per value, all of the same norm.
    The tower is then frozen while the projector and decoder learn to talk about it.
    The heads and codes are thrown away; only the tower is kept (``vision_tower.pt``).
    """
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    model = LlavaForConditionalGeneration(target_config(processor.tokenizer))
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, sum(CELL_HEADS))
    codes = cell_codes(tower.config.hidden_size, args.seed)
    pool = build_pool(processor, args.pool, work / f"pool_{args.pool}.pt")
    labels = torch.stack([cell_labels(s) for s in pool["seeds"]])
    val_seeds = range(900, 900 + args.val)
    val_pix, val_lab = heldout_pixels(processor, val_seeds), torch.stack([cell_labels(s) for s in val_seeds])
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    ckpt, start = work / "vision_ckpt.pt", 0
    if args.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        tower.load_state_dict(st["tower"])
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["gen"])
        start = st["step"]
        print(f"resumed from step {start}", flush=True)
    tower.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train vision", mininterval=5)
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(len(pool["seeds"]), (args.batch,), generator=g)
        feats = image_features(tower, pool["pixels"][idx].float())
        logits = head(feats).split(CELL_HEADS, -1)
        lab = labels[idx]
        loss = sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), lab[..., i].flatten())
                   for i, lg in enumerate(logits))
        # ...and a fixed code per value: every attribute gets its own equally loud direction
        code_err = (feats - code_targets(codes, lab)).pow(2).sum(-1).mean() / codes[0].pow(2).sum()
        loss = loss + code_err
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", code=f"{code_err.item():.4f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            tower.eval()
            acc = cell_accuracy(tower, head, val_pix, val_lab)
            tower.train()
            msg = " ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items())
            tqdm.write(f"step {step + 1} loss {loss.item():.4f} code {code_err.item():.4f} | held-out scenes {val_seeds.start}.."
                       f"{val_seeds.stop - 1}: {msg}")
        if (step + 1) % args.ckpt_every == 0:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"tower": tower.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(),
                        "gen": g.get_state(), "step": step + 1}, tmp)
            os.replace(tmp, ckpt)
    tower.eval()
    # Loud image tokens: with features of norm ~8 the decoder's attention blurred the cells into each other
    # and it learned to read them 2x slower than from the untrained tower's norm-70 features.
    scale_tower_output(tower, FEATURE_SCALE)
    with torch.no_grad():
        head.weight.div_(FEATURE_SCALE)
    torch.save(tower.state_dict(), work / "vision_tower.pt")
    (work / "vision_report.json").write_text(json.dumps(
        {"steps": args.steps, "heldout_seeds": [val_seeds.start, val_seeds.stop - 1],
         "heldout_cell_accuracy": cell_accuracy(tower, head, val_pix, val_lab)}, indent=1) + "\n")
    print(f"saved {work / 'vision_tower.pt'}", flush=True)
