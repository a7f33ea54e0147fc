"""``mmspec train-drafter``: distil a drafter (text, visual or eagle) from any supported target.

1. Self-distillation data: the target answers every (image, prompt) greedily; the answer ids, the target's
   top-K next-token distributions along the answer, and (visual) the pooled source features are written to
   ``OUT/distill/`` in shards, so an interrupted run keeps what it computed.
2. Training: the drafter (and, for ``visual``, the projector that turns pooled features into ``m`` visual
   tokens) learns the target's distributions with KL or total-variation loss (DistillSpec / TVD++), with
   periodic checkpoints in ``OUT/checkpoint.pt`` and ``--resume``.
3. Export: an HF folder (weights in safetensors, tokenizer, projector) that ``mmspec.load(drafter=OUT,
   drafter_kind=...)`` takes directly, then the held-out acceptance measured through the real engine.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from mmspec.errors import MMSpecError

SHARD = 128


@dataclass
class Example:
    image: object          # path or PIL.Image
    prompt: str
    name: str


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def read_examples(args) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples from --data, or from the bundled synthetic world by default."""
    if args.data is None:
        if args.target is not None:
            raise MMSpecError("--data is required with --target (a folder of images or a JSONL of image/prompt)")
        from vision.scenes import HELDOUT_SEEDS, KINDS, TRAIN_SEED_START, examples_for_scene

        def scene_examples(seeds, offset):
            out = []
            for i, seed in enumerate(seeds):
                kinds = ("caption", KINDS[1 + (i + offset) % (len(KINDS) - 1)])
                for ex in examples_for_scene(seed, kinds=kinds):
                    out.append(Example(ex.image, ex.prompt, f"scene{seed}:{ex.kind}"))
            return out

        # training scenes come after the target's own training range start; held-out ones from the held-out range
        train = scene_examples(range(TRAIN_SEED_START + 500_000, TRAIN_SEED_START + 500_000 + args.scenes), 0)
        held = scene_examples(list(HELDOUT_SEEDS)[200:200 + args.heldout], 1)
        return train, held
    path = Path(args.data)
    if path.is_dir():
        files = _image_files(path)
        examples = [Example(str(f), prompt, f"{f}:{prompt}") for f in files for prompt in args.prompt]
    elif path.is_file():
        examples = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                img = Path(row["image"])
                img = img if img.is_absolute() else path.parent / img
                examples.append(Example(str(img), row.get("prompt") or args.prompt[0], f"{img}:{row.get('prompt')}"))
            except (ValueError, KeyError) as e:
                raise MMSpecError(f"{path}:{n}: expected a JSON object with 'image' (and optional 'prompt'): {e}")
    else:
        raise MMSpecError(f"--data {path} is neither a folder nor a JSONL file")
    if len(examples) < 2:
        raise MMSpecError(f"--data {path}: need at least 2 examples, found {len(examples)}")
    random.Random(0).shuffle(examples)
    n_held = min(args.heldout, max(1, len(examples) // 5))
    return examples[n_held:], examples[:n_held]


# ---------------------------------------------------------------------------------------------- 1. data
def source_features(pipe, request, args) -> torch.Tensor:
    """Features the visual tokens are made from: the target's own (cached), or an open_clip embedding."""
    if args.visual_source == "open_clip":
        from vision.openclip import OpenClipEncoder

        enc = OpenClipEncoder.get(args.open_clip_model, args.open_clip_pretrained, pipe.adapter.device)
        return enc.features(request.image, pipe.adapter.vision_cache)[0]
    return request.features


def target_answer(pipe, ex: Example, args):
    """(the target's greedy answer, its prepared request with image features), or None for an unusable image."""
    from vision.images import load_image

    try:
        res = pipe.generate(ex.image, ex.prompt, max_new_tokens=args.max_new_tokens)
        image = load_image(ex.image)
    except MMSpecError as e:
        print(f"skipping {ex.name}: {e}")
        return None
    request = pipe.adapter.prepare(image, pipe.adapter.format_prompt(ex.prompt))
    pipe.adapter.image_features(request)
    return res, request


def distill_example(pipe, ex: Example, args, pool_m: int | None) -> dict | None:
    """The target's greedy answer and its top-K distributions along it (None if the image is unusable)."""
    import torch

    from vision.compress import pool_tokens

    adapter = pipe.adapter
    got = target_answer(pipe, ex, args)
    if got is None:
        return None
    res, request = got
    answer = res.token_ids
    with torch.inference_mode():
        session = adapter.session(request)
        # [L, vocab]: the target's distribution for each answer token
        logits = session.forward(torch.tensor([request.prompt_ids[-1]] + answer[:-1], device=adapter.device))
        probs = logits.float().softmax(-1)
    k = min(args.top_k, probs.shape[-1])
    top_p, top_i = probs.topk(k, dim=-1)
    row = {"prompt_ids": request.text_only_ids, "answer": answer, "top_p": top_p.half().cpu(),
           "top_i": top_i.int().cpu(), "name": ex.name}
    if pool_m:
        row["pooled"] = pool_tokens(source_features(pipe, request, args).float(), pool_m).half().cpu()
    return row


def build_distill_data(pipe, examples: list[Example], folder: Path, args, pool_m: int | None, desc: str,
                       make_row=None) -> list[dict]:
    import torch

    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    n_shards = (len(examples) + SHARD - 1) // SHARD
    with tqdm(total=len(examples), desc=desc, unit="ex") as bar:
        for s in range(n_shards):
            shard = folder / f"shard_{s:05d}.pt"
            if shard.exists():  # done in an earlier run
                rows.extend(torch.load(shard, weights_only=False))
                bar.update(min(SHARD, len(examples) - s * SHARD))
                continue
            part = []
            for ex in examples[s * SHARD:(s + 1) * SHARD]:
                row = (make_row or distill_example)(pipe, ex, args, pool_m)
                if row is not None:
                    part.append(row)
                bar.update()
            tmp = shard.with_suffix(".tmp")
            torch.save(part, tmp)
            tmp.replace(shard)  # atomic: a shard is either complete or absent
            rows.extend(part)
    return rows


# ---------------------------------------------------------------------------------------------- 2. train
def make_drafter(args, pipe):
    """The drafter to train: --init-drafter's weights, the bundled text drafter, or a new small Llama."""
    import torch

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mmspec.loading import BUNDLED_TEXT_DRAFTER, from_pretrained

    init = args.init_drafter or (BUNDLED_TEXT_DRAFTER if args.target is None else None)
    if init:
        model = from_pretrained(AutoModelForCausalLM, "drafter", init, dtype=torch.float32, use_safetensors=True)
        return model
    tok = pipe.processor.tokenizer
    hidden, layers = args.hidden_size, args.num_layers
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=pipe.adapter.context_length, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def batch_loss(drafter, projector, rows: list[dict], loss_kind: str, unk: int) -> torch.Tensor:
    import torch

    embed = drafter.get_input_embeddings()
    rows_n = embed.weight.shape[0]
    seqs, spans = [], []
    for r in rows:
        ids = [t if t < rows_n else unk for t in r["prompt_ids"] + r["answer"][:-1]]
        e = embed(torch.tensor(ids))
        m = 0
        if projector is not None:
            v = projector(r["pooled"].float())
            e = torch.cat([v, e])
            m = v.shape[0]
        start = m + len(r["prompt_ids"]) - 1
        seqs.append(e)
        spans.append((start, len(r["answer"])))
    width = max(s.shape[0] for s in seqs)
    hidden = seqs[0].shape[-1]
    # [B, T, hidden], right padded
    x = torch.zeros(len(seqs), width, hidden)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    logq = drafter(inputs_embeds=x, attention_mask=mask).logits.float().log_softmax(-1)
    total, count = 0.0, 0
    for i, (r, (start, n)) in enumerate(zip(rows, spans)):
        # [n, vocab] drafter log-probs where the target's answer tokens are predicted
        lq = logq[i, start:start + n]
        p = r["top_p"].float()
        p = p / p.sum(-1, keepdim=True)
        idx = r["top_i"].long().clamp_max(lq.shape[-1] - 1)
        lq_top = lq.gather(-1, idx)
        if loss_kind == "kl":
            total = total + (p * (p.clamp_min(1e-9).log() - lq_top)).sum()
        else:  # total variation over the target's top-K, plus the drafter's mass outside it
            q_top = lq_top.exp()
            total = total + 0.5 * ((p - q_top).abs().sum(-1) + (1 - q_top.sum(-1)).clamp_min(0)).sum()
        count += n
    return total / max(count, 1)


def train(args, modules: dict, loss_fn, rows: list[dict], out: Path, desc: str) -> None:
    """AdamW with warm-up and linear decay over ``modules``' parameters, minimising ``loss_fn(batch of rows)``;
    a checkpoint every ``--checkpoint-every`` steps in OUT/checkpoint.pt, which ``--resume`` continues from."""
    import torch

    from tqdm import tqdm

    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.steps // 20)) * max(0.05, 1 - s / max(1, args.steps)))
    ckpt = out / "checkpoint.pt"
    step = 0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if set(state.get("modules", {})) != set(modules):
            raise MMSpecError(f"{ckpt} holds {sorted(state.get('modules', {}))}, not {sorted(modules)}: it was "
                              "written by another --kind; use another --out or drop --resume")
        for name, m in modules.items():
            m.load_state_dict(state["modules"][name])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
        print(f"resumed from {ckpt} at step {step}")
    for m in modules.values():
        m.train()
    rng = random.Random(args.seed + step)
    with tqdm(total=args.steps, initial=step, desc=desc, unit="step") as bar:
        while step < args.steps:
            loss = loss_fn(rng.sample(rows, min(args.batch_size, len(rows))))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
            if step % args.checkpoint_every == 0 or step == args.steps:
                state = {"modules": {n: m.state_dict() for n, m in modules.items()}, "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "step": step}
                torch.save(state, ckpt.with_suffix(".tmp"))
                ckpt.with_suffix(".tmp").replace(ckpt)
    for m in modules.values():
        m.eval()


def train_causal_lm(args, pipe, rows: list[dict], out: Path):
    """The text drafter (and, for ``visual``, its projector) on the target's distributions along its answers."""
    from vision.compress import VisualProjector

    drafter = make_drafter(args, pipe).float()
    projector = None
    if args.kind == "visual":
        in_dim = rows[0]["pooled"].shape[-1]
        projector = VisualProjector(in_dim, drafter.config.hidden_size, args.num_visual_tokens,
                                    source=args.visual_source, open_clip_model=args.open_clip_model,
                                    open_clip_pretrained=args.open_clip_pretrained)
    tok = pipe.processor.tokenizer
    unk = tok.unk_token_id if tok.unk_token_id is not None else 0
    modules = {"drafter": drafter, **({"projector": projector} if projector is not None else {})}
    train(args, modules, lambda batch: batch_loss(drafter, projector, batch, args.loss, unk), rows, out,
          f"train {args.kind} drafter")
    return drafter, projector


# ---------------------------------------------------------------------------------------------- eagle
def eagle_example(pipe, ex: Example, args, pool_m=None) -> dict | None:
    """The target's greedy answer and its last hidden state at every position of prompt + answer."""
    import torch

    from mmspec.targets.base import TargetBatch

    adapter = pipe.adapter
    got = target_answer(pipe, ex, args)
    if got is None:
        return None
    res, request = got
    with torch.inference_mode():
        batch = TargetBatch(adapter, want_hidden=True)
        batch.add(0, request)
        ids = torch.tensor([request.prompt_ids[-1]] + res.token_ids, device=adapter.device)
        batch.verify({0: ids})
        hidden = batch.hidden[0]                        # [L + answer, H]
    return {"ids": request.prompt_ids + res.token_ids, "prompt_len": len(request.prompt_ids),
            "hidden": hidden.half().cpu(), "features": request.features.half().cpu(), "name": ex.name}


def ttt_mask(M: int, steps: int) -> "torch.Tensor":
    """Attention of the head unrolled ``steps`` times over M positions (training-time test, EAGLE-3): copy s at
    position p is the chain drafted from base p - s; it sees the true copy up to p - s and its own chain's
    earlier copies, exactly what the head sees at drafting step s + 1. -> [(steps+1)M, (steps+1)M] bool."""
    import torch

    n = (steps + 1) * M
    allowed = torch.zeros(n, n, dtype=torch.bool)
    p = torch.arange(M)
    for s in range(steps + 1):
        q = s * M + p
        base = p - s
        # true keys at positions <= base
        allowed[q[:, None], p[None, :]] = p[None, :] <= base[:, None]
        for s2 in range(1, s + 1):
            k = base + s2
            ok = (base >= 0)
            allowed[q[ok], s2 * M + k[ok]] = True
    return allowed


def eagle_loss(head, drafter_parts, rows: list[dict], steps: int, reg_weight: float = 1.0) -> "torch.Tensor":
    """Regression to the target's next hidden state plus KL to its next-token distribution, at answer
    positions, for the true features and ``steps`` rounds of the head's own predictions (``ttt_mask``)."""
    import torch

    embed, lm_head, image_ids = drafter_parts
    total, count = 0.0, 0
    for r in rows:
        ids = torch.tensor(r["ids"])
        h = r["hidden"].float()
        N = ids.shape[0]
        M = N - 1
        with torch.no_grad():
            tok = embed(ids).float()
            is_image = torch.isin(ids, image_ids)
            feats = torch.zeros_like(tok)
            if bool(is_image.any()):
                feats[is_image] = r["features"].float()
            target_logp = lm_head(h[1:]).float().log_softmax(-1)          # [M, vocab] predicts x_{t+2}
        u = head.inputs(tok, feats, is_image)[1:]                          # [M, H] input of position t+1
        start = max(r["prompt_len"] - 2, 0)                                # head outputs that predict answer tokens
        hidden_in = h[:-1]
        allowed = ttt_mask(M, steps)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        positions = torch.arange(M).repeat(steps + 1)[None]
        outs = []
        for s in range(steps + 1):
            # copy j's hidden input at p is copy j-1's prediction at p-1 (copy 0: the target's own)
            hid = [hidden_in]
            for prev in outs:
                hid.append(torch.cat([hidden_in[:1], prev[:-1]]))
            n = len(hid) * M
            f = head(torch.cat(hid)[None], u.repeat(len(hid), 1)[None], mask[..., :n, :n], positions[:, :n])[0]
            outs = [f[j * M:(j + 1) * M] for j in range(len(hid))]
        for s, f in enumerate(outs):
            lo = max(start, s)
            if lo >= M:
                continue
            logq = lm_head(f[lo:]).float().log_softmax(-1)
            p = target_logp[lo:].exp()
            kl = (p * (target_logp[lo:] - logq)).sum(-1)
            reg = torch.nn.functional.smooth_l1_loss(f[lo:], h[1:][lo:], reduction="none").mean(-1)
            total = total + (kl + reg_weight * reg).sum() / (s + 1)
            count += M - lo
    return total / max(count, 1)


def train_eagle(args, pipe, rows: list[dict], out: Path):
    import torch

    from mmspec.drafters.eagle import EagleHead, head_config_for

    adapter = pipe.adapter
    cfg = head_config_for(adapter, args.eagle_intermediate_size)
    if args.draft_vocab:
        # VocabTrim: the tokens the target emits most in its own answers (and every end-of-sequence id)
        counts = torch.zeros(adapter.vocab_size)
        for r in rows:
            counts.index_add_(0, torch.tensor(r["ids"][r["prompt_len"]:]), torch.ones(len(r["ids"]) - r["prompt_len"]))
        keep = set(counts.topk(min(args.draft_vocab, int((counts > 0).sum()))).indices.tolist()) | set(adapter.eos_token_ids)
        cfg["draft_vocab"] = sorted(keep)
    cfg["stop_threshold"] = args.stop_threshold
    torch.manual_seed(args.seed)
    head = EagleHead(cfg).float()
    embed = adapter.model.get_input_embeddings().float()
    lm_head = adapter.model.get_output_embeddings().float()
    for p in list(embed.parameters()) + list(lm_head.parameters()):
        p.requires_grad_(False)
    image_ids = torch.tensor(sorted(adapter.feature_token_ids))
    parts = (embed, lm_head, image_ids)
    train(args, {"head": head}, lambda batch: eagle_loss(head, parts, batch, args.ttt_steps), rows, out,
          "train eagle head")
    return head


# ---------------------------------------------------------------------------------------------- 3. export
def export(drafter, projector, pipe, out: Path, save_dtype: str) -> None:
    import torch

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[save_dtype]
    if projector is None and not hasattr(drafter, "config"):   # an eagle head: weights + its own config
        drafter.save_pretrained(out, dtype)
        return
    drafter.to(dtype).save_pretrained(out, safe_serialization=True)
    pipe.processor.tokenizer.save_pretrained(out)
    if projector is not None:
        projector.to(dtype).save_pretrained(out)


def evaluate(pipe, out: Path, kind: str, examples: list[Example], max_new_tokens: int) -> dict:
    """Held-out acceptance of the exported drafter, through the real engine (and its losslessness)."""
    from tqdm import tqdm

    from mmspec.drafters import drafter_class
    from mmspec.pipeline import Pipeline

    strategy = drafter_class(kind).from_pretrained(pipe.adapter, out, pipe.target.dtype)
    ours = Pipeline(pipe.adapter, strategy)
    tokens = forwards = drafted = accepted = mismatches = 0
    for ex in tqdm(examples, desc="held-out acceptance", unit="ex"):
        try:
            a = ours.generate(ex.image, ex.prompt, max_new_tokens=max_new_tokens)
            b = pipe.generate(ex.image, ex.prompt, max_new_tokens=max_new_tokens)
        except MMSpecError:
            continue
        mismatches += a.token_ids != b.token_ids
        tokens += a.stats.new_tokens
        forwards += a.stats.target_forwards
        drafted += a.stats.drafted_tokens
        accepted += a.stats.accepted_tokens
    return {"examples": len(examples), "mean_accepted": round(tokens / max(forwards, 1), 3),
            "acceptance_rate": round(accepted / max(drafted, 1), 3), "outputs_differing_from_target": mismatches}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmspec.cli import add_model_arguments

    add_model_arguments(parser)
    g = parser.add_argument_group("training")
    g.add_argument("--kind", choices=("text", "visual", "eagle"), default="visual",
                   help="drafter kind to train: a text LM, a text LM fed compressed visual tokens, or an eagle head "
                        "over the target's hidden states")
    g.add_argument("--out", required=True, help="output folder (HF format; also holds data and checkpoints)")
    g.add_argument("--data", default=None, help="folder of images or JSONL of {image, prompt} "
                                                "(default: the bundled synthetic world)")
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
    g.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import torch

    import mmspec

    if args.steps < 1 or args.batch_size < 1 or args.num_visual_tokens < 1 or args.heldout < 1:
        raise MMSpecError("--steps, --batch-size, --num-visual-tokens and --heldout must be at least 1")
    if args.ttt_steps < 0 or args.draft_vocab < 0 or not 0.0 <= args.stop_threshold < 1.0:
        raise MMSpecError("--ttt-steps and --draft-vocab must be >= 0 and --stop-threshold in [0, 1)")
    args.prompt = args.prompt or ["Describe the image."]
    torch.manual_seed(args.seed)
    from mmspec.outputs import check_own_folder

    out = Path(args.out)
    # a folder train-drafter wrote (to resume or redo) or a new one; never a folder of the user's own files
    check_own_folder(out, "--out", ("checkpoint.pt", "distill", "train_report.json", "config.json",
                                    "eagle_config.json"))
    out.mkdir(parents=True, exist_ok=True)
    # The target answers through mmspec itself (lossless, so the answers are the target's greedy ones, only
    # sooner); --drafter/--drafter-kind pick the helper drafter, by default the bundled text drafter or ngram.
    kind = args.drafter_kind if args.drafter_kind in (None, "text", "ngram", "none") else None
    drafter = None if str(args.drafter).lower() == "none" else args.drafter
    pipe = mmspec.load(target=args.target, preset=args.preset, drafter=drafter, drafter_kind=kind,
                       device=args.device, dtype=args.dtype, device_map=args.device_map,
                       trust_remote_code=args.trust_remote_code)
    train_ex, held_ex = read_examples(args)
    m = args.num_visual_tokens if args.kind == "visual" else None
    t0 = time.time()
    data_dir = out / "distill" / (f"{args.visual_source}-m{m}" if m else args.kind if args.kind == "eagle" else "text")
    rows = build_distill_data(pipe, train_ex, data_dir, args, m, "target answers (self-distillation)",
                              make_row=eagle_example if args.kind == "eagle" else None)
    if not rows:
        raise MMSpecError("no usable training examples (every image failed to load)")
    if args.kind == "eagle":
        drafter, projector = train_eagle(args, pipe, rows, out), None
    else:
        drafter, projector = train_causal_lm(args, pipe, rows, out)
    export(drafter, projector, pipe, out, args.save_dtype)
    report = evaluate(pipe, out, args.kind, held_ex, args.max_new_tokens)
    if args.kind == "eagle" and report["examples"] and report["acceptance_rate"] > 0:
        from mmspec.drafters.eagle import record_acceptance

        record_acceptance(out, report["acceptance_rate"])   # the head's own prior for the draft-length policy
    report.update(kind=args.kind, train_examples=len(rows), steps=args.steps, minutes=round((time.time() - t0) / 60, 1))
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0
