"""Training an EAGLE-3 head (kind ``eagle``, ``mmspec.drafters.eagle3``): its data rows (the target's aux hidden
states and last hidden state along prompt + answer), the training-time-test attention mask, the loss, and the
head's training. The head learns exactly what it runs: row t = (token t+1 embedded, fc(aux_t)), the k-th unrolled
copy fed the (k-1)-th copy's pre-norm output, loss = KL to the target's next-token distribution over the draft
vocabulary (SpecForge's target_p restricted by t2d)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmspec.training.data import Example, target_answer
from mmspec.training.loop import train

if TYPE_CHECKING:
    import torch  # for annotations: functions import torch themselves, so `mmspec train-drafter --help` stays light


def aux_ids_for(adapter, chosen: str | None = None) -> tuple[int, ...]:
    """The aux layers our heads read: ``chosen`` (``--eagle-aux-layers``, a comma list of three HF
    ``hidden_states`` indices in [1, N-1]), else the ecosystem default (2, N // 2, N - 3) (what every engine assumes
    when a config names none), or the last three layer inputs for targets too shallow for it."""
    from mmspec.drafters.eagle3 import aux_layer_ids
    from mmspec.errors import MMSpecError

    n = int(adapter.model.config.get_text_config().num_hidden_layers)
    if n < 4:
        raise MMSpecError(f"an EAGLE-3 head reads the inputs of three distinct target layers (1 .. N-1): this target "
                          f"has {n} decoder layers, it needs at least 4")
    if chosen:
        try:
            ids = [int(i) for i in str(chosen).split(",") if i.strip()]
        except ValueError:
            raise MMSpecError(f"--eagle-aux-layers takes three comma-separated layer indices, got {chosen!r}",
                              param="eagle_aux_layers") from None
        return aux_layer_ids({"eagle_aux_hidden_state_layer_ids": ids}, n, "--eagle-aux-layers")
    default = (2, n // 2, n - 3)
    ids = default if len(set(default)) == 3 else (n - 3, n - 2, n - 1)
    return aux_layer_ids({"eagle_aux_hidden_state_layer_ids": list(ids)}, n)


def eagle_example(pipe, ex: Example, args, pool_m=None) -> dict | None:
    """The target's greedy answer, its aux hidden states and last hidden state at every position of prompt +
    answer, and the positions the head takes there (the target's own: 3-D for Qwen-VL)."""
    import torch

    from mmspec.targets.batch import TargetBatch

    adapter = pipe.adapter
    got = target_answer(pipe, ex, args)
    if got is None:
        return None
    res, request = got
    n = int(adapter.model.config.get_text_config().num_hidden_layers)
    with torch.inference_mode():
        batch = TargetBatch(adapter, want_hidden=aux_ids_for(adapter, args.eagle_aux_layers) + (n,))
        batch.add(0, request)
        ids = torch.tensor([request.prompt_ids[-1]] + res.token_ids, device=adapter.device)
        batch.verify({0: ids})
        states = batch.hidden[0]                        # [L + answer, 4H]: three aux states, then the last
        T = len(request.prompt_ids) + len(res.token_ids)
        positions = adapter.positions(request)(torch.arange(T, device=adapter.device))
    return {"ids": request.prompt_ids + res.token_ids, "prompt_len": len(request.prompt_ids),
            "states": states.half().cpu(), "positions": positions.cpu(), "name": ex.name}


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


def eagle_loss(head, parts, rows: list[dict], steps: int) -> "torch.Tensor":
    """KL from the target's next-token distribution (over the draft vocabulary) to the head's, at the positions
    that draft answer tokens, for the true features and ``steps`` rounds of the head's own outputs
    (``ttt_mask``; copy s weighted 0.8^s as EAGLE-3)."""
    import torch

    embed, lm_head = parts
    vocab = head.draft_to_target
    H = head.H
    total, count = 0.0, 0
    for r in rows:
        ids = torch.tensor(r["ids"])
        states = r["states"].float()
        aux, last = states[:, :3 * H], states[:, 3 * H:]
        M = ids.shape[0] - 1
        with torch.no_grad():
            tok = embed(ids[1:]).float()                                     # row t: token t+1
            target_logp = lm_head(last[1:])[:, vocab].float().log_softmax(-1)  # row t predicts token t+2
        pos = r["positions"]
        pos = (pos[1:] if head.mrope_section is not None and pos.shape[0] == 4 else pos[:1])[..., :M]
        positions = pos.repeat(1, steps + 1)[:, None] if pos.shape[0] == 3 else pos.repeat(1, steps + 1)
        start = max(r["prompt_len"] - 2, 0)
        allowed = ttt_mask(M, steps)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        fused = head.fc(aux[:-1])                                            # [M, H]
        outs = []
        for s in range(steps + 1):
            hid = [fused] + [torch.cat([fused[:1], prev[:-1]]) for prev in outs]   # copy j at p: copy j-1 at p-1
            n = len(hid) * M
            f = head(tok.repeat(len(hid), 1)[None], torch.cat(hid)[None], mask[..., :n, :n], positions[..., :n])[0]
            outs = [f[j * M:(j + 1) * M] for j in range(len(hid))]
        for s, f in enumerate(outs):
            lo = max(start, s)
            if lo >= M:
                continue
            logq = head.draft_logits(f[lo:]).float().log_softmax(-1)
            p = target_logp[lo:].exp()
            total = total + (0.8 ** s) * (p * (target_logp[lo:] - logq)).sum()
            count += M - lo
    return total / max(count, 1)


def train_eagle(args, pipe, rows: list[dict], out: Path):
    import torch

    from mmspec.drafters.eagle3 import head_for_target

    adapter = pipe.adapter
    vocab = None
    if args.draft_vocab:
        # VocabTrim: the tokens the target emits most in its own answers (and every end-of-sequence id), sorted
        counts = torch.zeros(adapter.vocab_size)
        for r in rows:
            counts.index_add_(0, torch.tensor(r["ids"][r["prompt_len"]:]), torch.ones(len(r["ids"]) - r["prompt_len"]))
        keep = set(counts.topk(min(args.draft_vocab, int((counts > 0).sum()))).indices.tolist()) | set(adapter.eos_token_ids)
        vocab = sorted(keep)
    torch.manual_seed(args.seed)
    head = head_for_target(adapter, vocab, args.eagle_intermediate_size,
                           aux_ids_for(adapter, args.eagle_aux_layers)).float()
    embed = adapter.model.get_input_embeddings().float()
    lm_head = adapter.model.get_output_embeddings().float()
    with torch.no_grad():   # start from the target's own output rows (the head's norm starts as the identity)
        head.lm_head.weight.copy_(lm_head.weight[head.draft_to_target])
    for p in list(embed.parameters()) + list(lm_head.parameters()):
        p.requires_grad_(False)
    train(args, {"head": head}, lambda batch: eagle_loss(head, (embed, lm_head), batch, args.ttt_steps), rows, out,
          "train eagle head")
    return head
