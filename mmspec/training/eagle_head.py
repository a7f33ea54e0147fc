"""Training an eagle head (kind ``eagle``) over the target's last hidden states: its data rows (the hidden
states along the target's answers), the training-time-test attention mask and loss (EAGLE-3), the head's
training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmspec.training.data import Example, target_answer
from mmspec.training.loop import train

if TYPE_CHECKING:
    import torch  # for annotations: functions import torch themselves, so `mmspec train-drafter --help` stays light


def eagle_example(pipe, ex: Example, args, pool_m=None) -> dict | None:
    """The target's greedy answer and its last hidden state at every position of prompt + answer."""
    import torch

    from mmspec.targets.batch import TargetBatch

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
