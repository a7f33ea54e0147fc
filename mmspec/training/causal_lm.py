"""Training a causal-LM drafter (kinds ``text`` and ``visual``): the drafter (and, for ``visual``, the projector
that turns pooled image features into ``m`` visual tokens) learns the target's top-K distributions along its
answers with KL or total-variation loss (DistillSpec / TVD++)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmspec.errors import MMSpecError
from mmspec.training.loop import train

if TYPE_CHECKING:
    import torch  # for annotations: functions import torch themselves, so `mmspec train-drafter --help` stays light


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
        if projector is not None and "pooled" in r:   # (a text-only row has no visual tokens)
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


def train_causal_lm(args, pipe, rows: list[dict], out: Path):
    """The text drafter (and, for ``visual``, its projector) on the target's distributions along its answers."""
    from vision.compress import VisualProjector

    drafter = make_drafter(args, pipe).float()
    projector = None
    if args.kind == "visual":
        pooled = next((r["pooled"] for r in rows if "pooled" in r), None)
        if pooled is None:
            raise MMSpecError("--kind visual learns from images, but every usable --data row is text only")
        in_dim = pooled.shape[-1]
        projector = VisualProjector(in_dim, drafter.config.hidden_size, args.num_visual_tokens,
                                    source=args.visual_source, open_clip_model=args.open_clip_model,
                                    open_clip_pretrained=args.open_clip_pretrained)
    tok = pipe.processor.tokenizer
    unk = tok.unk_token_id if tok.unk_token_id is not None else 0
    modules = {"drafter": drafter, **({"projector": projector} if projector is not None else {})}
    train(args, modules, lambda batch: batch_loss(drafter, projector, batch, args.loss, unk), rows, out,
          f"train {args.kind} drafter")
    return drafter, projector
