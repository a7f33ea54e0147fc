"""The training loop every drafter kind shares (step 2 of ``mmspec train-drafter``): AdamW over some modules,
minimising a loss over batches of distillation rows, with checkpoints that ``--resume`` continues from."""

from __future__ import annotations

import random
from pathlib import Path

from mmspec.errors import MMSpecError


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

