"""Build, train, export and evaluate the bundled default VLM + text drafter.

The models know only the synthetic scene world of :mod:`vision.scenes`.

    python -m demos.build_default_models all            # everything from scratch, ~55 min of training on
                                                        # 2 cores; exports over assets/models
    python -m demos.build_default_models train-vision   # stage 1: the CLIP tower learns to see the grid
    python -m demos.build_default_models train-target   # stage 2: projector + decoder (add --resume to continue)
    python -m demos.build_default_models tune-questions # stage 3: mostly questions, heads shown where to look
    python -m demos.build_default_models distill-drafter
    python -m demos.build_default_models export
    python -m demos.build_default_models eval --n 200
    python -m demos.build_default_models look           # where the lookup head looks on held-out questions
    python -m demos.build_default_models bench

Nothing is downloaded: tokenizer, processor and models are built from configs.
Scratch output (checkpoints, pools) goes to ``runs/`` (see --workdir).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from tqdm import tqdm

from vision import scenes
from vision.scenes import (
    KINDS, TRAIN_SEED_START, DEFAULT_RENDER_SIZE, bundled_paths, is_correct,
)

ROOT = scenes.ROOT
IMAGE_SIZE = 72
PATCH = 24  # one patch per cell of the 3x3 grid: each image token sees one object
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 9 (CLS dropped by "default")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in parts %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in parts %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in parts %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# --------------------------------------------------------------------------- tokenizer / processor

def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in scenes.vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = build_tokenizer()
    ip = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
    )


def chat_prompt(processor, text: str) -> str:
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------- model configs

def target_config(tok):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=256, num_channels=3,
    )
    # Deep and narrow: at batch 1 on a CPU a layer costs ~0.6 ms whatever its width, so 16 layers make
    # the target's per-token forward >8x the 1-layer drafter's while training FLOPs stay small.
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=192, intermediate_size=576, num_hidden_layers=16,
        num_attention_heads=4, num_key_value_heads=4, head_dim=48, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=False,
    )
    return cfg


def drafter_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )


def set_generation_config(model, tok, max_new_tokens=48):
    gc = model.generation_config
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.bos_token_id
    gc.do_sample = False
    gc.max_new_tokens = max_new_tokens
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)


# --------------------------------------------------------------------------- data

class PromptCache:
    """Token ids of chat-formatted prompts (image placeholders expanded) and answers."""

    def __init__(self, processor):
        from PIL import Image

        self.processor = processor
        self.tok = processor.tokenizer
        self._dummy = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        self.prompts: dict[str, list[int]] = {}
        self.answers: dict[str, list[int]] = {}

    def prompt_ids(self, text: str) -> list[int]:
        if text not in self.prompts:
            enc = self.processor(images=self._dummy, text=chat_prompt(self.processor, text), return_tensors="pt")
            self.prompts[text] = enc["input_ids"][0].tolist()
        return self.prompts[text]

    def answer_ids(self, text: str) -> list[int]:
        if text not in self.answers:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            assert self.tok.unk_token_id not in ids, text
            self.answers[text] = ids + [self.tok.eos_token_id]
        return self.answers[text]


def build_pool(processor, n_scenes: int, path: Path, seed_start: int = TRAIN_SEED_START):
    """Pre-render training scenes once into normalised pixel tensors (cached on disk)."""
    if path.exists():
        d = torch.load(path)
        if d["pixels"].shape[0] == n_scenes:
            return d
    pixels = torch.empty(n_scenes, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float16)
    seeds = list(range(seed_start, seed_start + n_scenes))
    chunk = 256
    for i in tqdm(range(0, n_scenes, chunk), desc="render pool"):
        imgs = []
        for s in seeds[i:i + chunk]:
            size = 288 if s % 5 == 0 else DEFAULT_RENDER_SIZE  # a few at the asset size
            imgs.append(scenes.render(scenes.scene_for_seed(s), size))
        pv = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        pixels[i:i + len(imgs)] = pv.to(torch.float16)
    d = {"pixels": pixels, "seeds": seeds}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(d, path)
    return d


KIND_WEIGHTS = {"caption": 0.4, "color": 0.15, "count": 0.15, "position": 0.15, "yesno": 0.15}
# Stage 3 (tune-questions): the questions that must find the object they name, mostly.
QUESTION_WEIGHTS = {"caption": 0.15, "color": 0.1, "count": 0.05, "position": 0.3, "yesno": 0.4}


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


def sample_batch(pool, cache: PromptCache, rng: random.Random, batch: int, per_image: int = 2,
                 kind_weights: dict[str, float] = KIND_WEIGHTS):
    """(input_ids, attention_mask, labels, pool indices) of a random batch; right padding."""
    tok = cache.tok
    n = len(pool["seeds"])
    seqs, labs, pix = [], [], []
    kinds, weights = list(kind_weights), list(kind_weights.values())
    while len(seqs) < batch:
        j = rng.randrange(n)
        scene = scenes.scene_for_seed(pool["seeds"][j])
        for kind in rng.choices(kinds, weights, k=per_image):
            p, a = scenes.prompt_for(scene, kind, rng)
            pids, aids = cache.prompt_ids(p), cache.answer_ids(a)
            seqs.append(pids + aids)
            labs.append([-100] * len(pids) + aids)
            pix.append(j)
    ids, mask, labels = _pad_batch(seqs[:batch], labs[:batch], tok.pad_token_id)
    return ids, mask, labels, torch.tensor(pix[:batch])


# --------------------------------------------------------------------------- generation / eval

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


def heldout_examples(n_scenes: int, start: int = 0):
    exs = []
    for s in range(start, start + n_scenes):
        assert s in scenes.HELDOUT_SEEDS
        exs += scenes.examples_for_scene(s)
    return exs


def score(examples, answers):
    per = defaultdict(lambda: [0, 0])
    for e, a in zip(examples, answers):
        per[e.kind][0] += is_correct(a, e)
        per[e.kind][1] += 1
    return per


def format_scores(per) -> str:
    lines = []
    tot = [0, 0]
    for k in KINDS:
        if k in per:
            c, n = per[k]
            tot[0] += c
            tot[1] += n
            lines.append(f"  {k:<9} {c:4d}/{n:<4d} = {100 * c / n:6.2f}%")
    q = [sum(per[k][0] for k in per if k != "caption"), sum(per[k][1] for k in per if k != "caption")]
    if q[1]:
        lines.append(f"  {'questions':<9} {q[0]:4d}/{q[1]:<4d} = {100 * q[0] / q[1]:6.2f}%")
    lines.append(f"  {'all':<9} {tot[0]:4d}/{tot[1]:<4d} = {100 * tot[0] / max(1, tot[1]):6.2f}%")
    return "\n".join(lines)


# --------------------------------------------------------------------------- train vision tower

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


# --------------------------------------------------------------------------- train target

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


# --------------------------------------------------------------------------- export

def _save_16bit(model, folder: Path, dtype=torch.float16):
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)


def cmd_export(args):
    """Copy trained models from the workdir into assets/models in 16-bit safetensors."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    work = Path(args.workdir)
    target_dir, drafter_dir = bundled_paths()
    processor = build_processor()
    src = work / "target_fp32"
    if src.exists() and args.what in ("all", "target"):
        m = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
        set_generation_config(m, processor.tokenizer)
        _save_16bit(m, target_dir)
        processor.save_pretrained(target_dir)
        print(f"exported target -> {target_dir}")
    src = work / "drafter_fp32"
    if src.exists() and args.what in ("all", "drafter"):
        m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        set_generation_config(m, processor.tokenizer)
        _save_16bit(m, drafter_dir)
        processor.tokenizer.save_pretrained(drafter_dir)
        print(f"exported text drafter -> {drafter_dir}")


def load_target(path=None, dtype=torch.float32, **kwargs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path) if path else bundled_paths()[0]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kwargs).eval()
    return model, processor


def load_drafter(path=None, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path else bundled_paths()[1]
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------- drafter distillation

def drafter_prompt_ids(target_prompt_ids, image_token_id):
    """The drafter's view of a target prompt: the same ids with every image placeholder removed."""
    return [t for t in target_prompt_ids if t != image_token_id]


@torch.no_grad()
def forced_greedy(model, processor, examples, batch_size=32, cache=None):
    """Exact greedy check by teacher forcing on the true answers (one forward per batch).

    Greedy decoding reproduces the true answer (+EOS) iff the argmax at every answer
    position equals the true token.  Returns per example (prompt_ids, answer_ids+EOS,
    matched: bool, first_argmax: the target's greedy first answer token).
    Right padding keeps every real position exactly as in an unpadded run.
    """
    cache = cache or PromptCache(processor)
    tok = processor.tokenizer
    res = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        pids = [cache.prompt_ids(e.prompt) for e in chunk]
        aids = [cache.answer_ids(e.answer) for e in chunk]
        ids, mask, _ = _pad_batch([p + a for p, a in zip(pids, aids)], [[] for _ in chunk], tok.pad_token_id)
        pix = processor.image_processor(images=[e.image for e in chunk], return_tensors="pt")["pixel_values"]
        pred = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits.argmax(-1)
        for b, (p, a) in enumerate(zip(pids, aids)):
            got = pred[b, len(p) - 1:len(p) - 1 + len(a)].tolist()
            res.append((p, a, got == a, got[0]))
    return res


@torch.no_grad()
def _generate_one(model, processor, e, max_new_tokens=48):
    tok = processor.tokenizer
    inputs = processor(images=e.image, text=chat_prompt(processor, e.prompt), return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ans = gen[0, inputs["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in ans:
        ans = ans[:ans.index(tok.eos_token_id) + 1]
    return inputs["input_ids"][0].tolist(), ans


@torch.no_grad()
def target_greedy_ids(model, processor, examples, batch_size=32, max_new_tokens=48):
    """Target prompt ids and unpadded batch-1 greedy answer ids (through EOS when produced).

    Uses the exact teacher-forcing check first and runs generate only where the
    target's greedy answer differs from the truth.
    """
    checked = forced_greedy(model, processor, examples, batch_size)
    miss = [i for i, c in enumerate(checked) if not c[2]]
    print(f"target greedy = truth on {len(examples) - len(miss)}/{len(examples)}; generating the rest", flush=True)
    res = [(p, a) for p, a, _, _ in checked]
    tok = processor.tokenizer
    for j in tqdm(range(0, len(miss), batch_size), desc="target greedy", mininterval=5):
        idx = miss[j:j + batch_size]
        if len(idx) == 1:
            res[idx[0]] = _generate_one(model, processor, examples[idx[0]], max_new_tokens)
            continue
        tok.padding_side = "left"
        chunk = [examples[i] for i in idx]
        inputs = processor(images=[e.image for e in chunk], text=[chat_prompt(processor, e.prompt) for e in chunk],
                           return_tensors="pt", padding=True)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        P = inputs["input_ids"].shape[1]
        for b, i in enumerate(idx):
            ans = []
            for t in gen[b, P:].tolist():
                if t == tok.pad_token_id:
                    break
                ans.append(t)
                if t == tok.eos_token_id:
                    break
            res[i] = (checked[i][0], ans)
    return res


def _pad_batch(seqs, labs, pad_id):
    L = -(-max(len(s) for s in seqs) // 8) * 8
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    return ids, mask, labels


def cmd_distill_drafter(args):
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.workdir)
    tpath = bundled_paths()[0] if (bundled_paths()[0] / "config.json").exists() else work / "target_fp32"
    print(f"distilling from target {tpath}", flush=True)
    target, processor = load_target(tpath)
    tok = processor.tokenizer
    img_id = target.config.image_token_id
    data_path = work / f"drafter_data_{args.scenes}.pt"
    if data_path.exists():
        data = torch.load(data_path)
    else:
        exs = []
        for s in range(TRAIN_SEED_START + 500_000, TRAIN_SEED_START + 500_000 + args.scenes):
            exs += scenes.examples_for_scene(s)
        data = target_greedy_ids(target, processor, exs)
        torch.save(data, data_path)
    seqs, labs = [], []
    for pids, ans in data:
        d = drafter_prompt_ids(pids, img_id)
        seqs.append(d + ans)
        labs.append([-100] * len(d) + ans)
    print(f"{len(seqs)} distillation sequences", flush=True)
    model = LlamaForCausalLM(drafter_config(tok))
    set_generation_config(model, tok)
    print(f"drafter parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(args.seed)
    model.train()
    for step in tqdm(range(args.steps), desc="distill drafter", mininterval=5):
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [rng.randrange(len(seqs)) for _ in range(args.batch)]
        ids, mask, labels = _pad_batch([seqs[i] for i in idx], [labs[i] for i in idx], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    out = work / "drafter_fp32"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"saved {out}", flush=True)


@torch.no_grad()
def measure_acceptance(target, processor, drafter, examples, k=4):
    """Greedy agreement of the drafter with the target on the target's greedy answers.

    token_match: fraction of answer positions (incl. EOS) where the drafter's greedy
    next token, teacher-forced on the target's greedy answer, equals the target's.
    mean_accepted: simulated greedy speculative decoding with draft length k: the
    mean number of drafted tokens accepted per target verification step.
    """
    img_id = target.config.image_token_id
    data = target_greedy_ids(target, processor, examples)
    match = total = 0
    acc_sum = rounds = 0
    for pids, ans in data:
        d = drafter_prompt_ids(pids, img_id)
        ids = torch.tensor([d + ans])
        pred = drafter(input_ids=ids).logits[0].argmax(-1).tolist()
        P = len(d)
        m = [pred[P - 1 + j] == ans[j] for j in range(len(ans))]
        match += sum(m)
        total += len(m)
        i = 0
        while i < len(ans):  # speculative rounds
            ctx = d + ans[:i]
            draft = []
            for _ in range(min(k, len(ans) - i)):
                nxt = drafter(input_ids=torch.tensor([ctx + draft])).logits[0, -1].argmax().item()
                draft.append(nxt)
            a = 0
            while a < len(draft) and draft[a] == ans[i + a]:
                a += 1
            acc_sum += a
            rounds += 1
            i += a + 1
    return {"token_match": match / max(1, total), "mean_accepted": acc_sum / max(1, rounds),
            "k": k, "answer_tokens": total, "rounds": rounds}


# --------------------------------------------------------------------------- eval / bench

def cmd_eval(args):
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = load_target(args.target)
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
          f"({args.method}), target {args.target or bundled_paths()[0]}")
    print(format_scores(per))
    if args.show_errors:
        for e, a in zip(exs, answers):
            if not is_correct(a, e):
                print(f"  seed {e.seed} {e.kind}: {e.prompt!r} -> {a!r} (truth {e.answer!r})")
    if args.acceptance:
        drafter, _ = load_drafter(args.drafter)
        acc = measure_acceptance(model, processor, drafter, heldout_examples(args.acceptance, start=args.start))
        print(f"text drafter vs target on {args.acceptance} held-out scenes x 5 prompts: "
              f"greedy token match {100 * acc['token_match']:.2f}% of {acc['answer_tokens']} answer tokens; "
              f"mean accepted tokens per round (k={acc['k']}) {acc['mean_accepted']:.3f}")
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
        ids, mask, _ = _pad_batch(pids, [[] for _ in chunk], tok.pad_token_id)
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
    model, processor = load_target(args.target, attn_implementation="eager")
    looks = noun_head_looks(model, processor, heldout_examples(args.n, start=args.start))
    layer, head = POINTER_HEADS["noun"]
    print(f"where the noun head (layer {layer}, head {head}) looks from the question's object word, mean "
          f"attention weight, held-out scenes {args.start}..{args.start + args.n - 1}, target "
          f"{args.target or bundled_paths()[0]}")
    print(f"  {'question':<10}" + "".join(f"{k:>13}" for k in LOOK_PLACES))
    for group, w in looks.items():
        print(f"  {group:<10}" + "".join(f"{w[k]:13.2f}" for k in LOOK_PLACES))


class _Stepper:
    """Single-token forwards with a KV cache on a fixed context (the new token is cropped)."""

    def __init__(self, model, prefix_ids, extra=None):
        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache()
        with torch.no_grad():
            out = model(input_ids=prefix_ids, past_key_values=self.cache, use_cache=True, **(extra or {}))
        self.nxt = out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def __call__(self):
        t = time.perf_counter()
        self.model(input_ids=self.nxt, past_key_values=self.cache, use_cache=True)
        dt = time.perf_counter() - t
        self.cache.crop(-1)
        return dt


def measure_latencies(target, processor, drafter, n=200, warmup=10):
    """Median per-token forward latency (s) of target and drafter, measured interleaved
    (alternating calls) so both see the same machine load."""
    e = heldout_examples(1)[0]
    inputs = processor(images=e.image, text=chat_prompt(processor, e.prompt), return_tensors="pt")
    ts = _Stepper(target, inputs["input_ids"], {"pixel_values": inputs["pixel_values"]})
    d_ids = torch.tensor([drafter_prompt_ids(inputs["input_ids"][0].tolist(), target.config.image_token_id)])
    ds = _Stepper(drafter, d_ids)
    tt, dd = [], []
    for i in range(n + warmup):
        a, b = ts(), ds()
        if i >= warmup:
            tt.append(a)
            dd.append(b)
    return float(np.median(tt)), float(np.median(dd))


def cmd_bench(args):
    torch.set_num_threads(args.threads)
    target, processor = load_target(args.target)
    drafter, _ = load_drafter(args.drafter)
    t_lat, d_lat = measure_latencies(target, processor, drafter, n=args.n)
    tp = sum(p.numel() for p in target.parameters())
    dp = sum(p.numel() for p in drafter.parameters())
    print(f"torch threads={args.threads}, {args.n} interleaved single-token forwards each, median")
    print(f"target : {tp / 1e6:.2f}M params, per-token forward (1 token, KV cache, fp32, CPU) {1e3 * t_lat:.2f} ms")
    print(f"drafter: {dp / 1e6:.3f}M params, per-token forward (1 token, KV cache, fp32, CPU) {1e3 * d_lat:.2f} ms")
    print(f"ratio target/drafter: {t_lat / d_lat:.1f}x")


def cmd_images(args):
    """Render sample held-out scenes into assets/images (288x288 PNG) + answers.json."""
    out = ROOT / "assets" / "images"
    out.mkdir(parents=True, exist_ok=True)
    meta = []
    for s in range(args.count):
        exs = scenes.examples_for_scene(s, size=288)
        name = f"scene_{s:03d}.png"
        exs[0].image.save(out / name)
        meta.append({"file": name, "seed": s, "caption": exs[0].scene.caption(),
                     "scene": exs[0].scene.to_dict(),
                     "prompts": [{"kind": e.kind, "prompt": e.prompt, "answer": e.answer} for e in exs]})
    (out / "answers.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.count} images to {out}")


def cmd_all(args):
    """The bundled models from scratch: every stage runs with its own parser defaults (the command lines below)."""
    def stage(*argv):
        common = ["--workdir", args.workdir, "--threads", str(args.threads), "--seed", str(args.seed)]
        return build_parser().parse_args(common + list(argv))

    resume = ["--resume"] if args.resume else []
    cmd_train_vision(stage("train-vision", *resume))
    cmd_train_target(stage("train-target", "--max-minutes", str(args.target_minutes), *resume))
    if args.tune_minutes > 0:
        cmd_train_target(stage("tune-questions", "--max-minutes", str(args.tune_minutes), *resume))
    cmd_export(stage("export", "--what", "target"))
    cmd_distill_drafter(stage("distill-drafter"))
    cmd_export(stage("export", "--what", "drafter"))
    cmd_images(stage("images"))
    cmd_eval(stage("eval", "--method", "forced", "--acceptance", "50"))
    cmd_bench(stage("bench", "--n", "300"))


# --------------------------------------------------------------------------- main

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


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


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
    p.set_defaults(fn=cmd_train_vision)

    p = sub.add_parser("train-target", help="stage 2: train projector + decoder on the frozen tower (CPU)")
    _training_args(p, steps=4000, batch=32, lr=1.5e-3, warmup=100, eval_every=250)
    _decoder_args(p, max_minutes=25, pointer_weight=0.0, kind_weights=KIND_WEIGHTS)
    p.set_defaults(fn=cmd_train_target)

    p = sub.add_parser("tune-questions",
                       help="stage 3: continue the stage-2 target with mostly questions, each answer weighted "
                            "equally (CPU)")
    _training_args(p, steps=4000, batch=32, lr=1.2e-3, warmup=50, eval_every=250)
    _decoder_args(p, max_minutes=25, pointer_weight=4.0, kind_weights=QUESTION_WEIGHTS, prev_pointer=True,
                  lookup_lr_mult=5.0)
    p.add_argument("--init-from", default=None,
                   help="stage-2 checkpoint to start from (default: WORKDIR/target_ckpt.pt)")
    p.set_defaults(fn=cmd_train_target)

    p = sub.add_parser("export", help="write trained models to assets/models (16-bit safetensors)")
    p.add_argument("--what", choices=["all", "target", "drafter"], default="all")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("distill-drafter", help="distill the text drafter on the target's greedy answers")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--scenes", type=int, default=60, help="training scenes (x5 prompts) answered by the target")
    p.set_defaults(fn=cmd_distill_drafter)

    p = sub.add_parser("look", help="where the noun pointer head looks on held-out position and yes/no "
                                    "questions (right object, same shape, same colour, BOS...)")
    p.add_argument("--n", type=int, default=200, help="held-out scenes")
    p.add_argument("--start", type=int, default=0, help="first held-out scene seed")
    p.add_argument("--target", default=None, help="target folder (default: bundled)")
    p.set_defaults(fn=cmd_look)

    p = sub.add_parser("eval", help="held-out accuracy per prompt type (and drafter acceptance)")
    p.add_argument("--n", type=int, default=200, help="held-out scenes (each asked all 5 prompt types)")
    p.add_argument("--start", type=int, default=0, help="first held-out scene seed")
    p.add_argument("--target", default=None, help="target folder (default: bundled)")
    p.add_argument("--drafter", default=None, help="drafter folder (default: bundled)")
    p.add_argument("--acceptance", type=int, default=0, help="also measure drafter acceptance on this many scenes")
    p.add_argument("--show-errors", action="store_true")
    p.add_argument("--method", choices=["generate", "forced"], default="generate",
                   help="generate: batched model.generate (left padding); forced: exact greedy check by "
                        "teacher forcing, batch-1 generate only for the misses (much faster)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="per-token forward latency of target and drafter")
    p.add_argument("--target", default=None)
    p.add_argument("--drafter", default=None)
    p.add_argument("--n", type=int, default=200, help="timed forwards per model")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("images", help="render sample held-out scenes to assets/images")
    p.add_argument("--count", type=int, default=16)
    p.set_defaults(fn=cmd_images)

    p = sub.add_parser("all", help="train-vision, train-target, tune-questions, export, distill-drafter, export, "
                                   "images, eval, bench (writes over assets/models)")
    p.add_argument("--resume", action="store_true", help="continue the decoder stages from their checkpoints")
    p.add_argument("--target-minutes", type=float, default=25, help="stage 2's wall-clock budget")
    p.add_argument("--tune-minutes", type=float, default=25, help="stage 3's wall-clock budget (0: skip stage 3)")
    p.set_defaults(fn=cmd_all)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
