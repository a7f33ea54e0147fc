"""Step 3 of ``mmspec train-drafter``: the trained drafter written as a folder ``mmspec.load(drafter=OUT,
drafter_kind=...)`` takes directly, and its held-out acceptance measured through the real engine."""

from __future__ import annotations

from pathlib import Path

from mmspec.errors import MMSpecError
from mmspec.training.data import Example


def export(drafter, projector, pipe, out: Path, save_dtype: str, layout: str = "specforge") -> None:
    """``drafter`` (and its ``projector``) saved in ``out`` in ``save_dtype``: an HF folder with weights in
    safetensors and the tokenizer, or, for an EAGLE-3 head, a folder vLLM and SGLang load as it is (``layout``
    "specforge": SpecForge/vLLM; "speculators"), the target recorded in its config."""
    import torch

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[save_dtype]
    if projector is None and not hasattr(drafter, "config"):   # an EAGLE-3 head
        from mmspec.drafters.eagle3 import export_head
        target = str(pipe.target.config._name_or_path)
        n = int(pipe.target.config.get_text_config().num_hidden_layers)
        export_head(drafter, out, layout, target, pipe.target.config, drafter.aux_layers(n), dtype,
                    extra={"mmspec_family": pipe.adapter.family})
        return
    drafter.to(dtype).save_pretrained(out, safe_serialization=True)
    pipe.processor.tokenizer.save_pretrained(out)
    if projector is not None:
        projector.to(dtype).save_pretrained(out)


def evaluate(pipe, out: Path, kind: str, examples: list[Example], max_new_tokens: int) -> dict:
    """Held-out acceptance of the exported drafter, through the real engine (and its losslessness)."""
    from tqdm import tqdm

    ours = pipe.with_drafter_kind(kind, drafter=out)
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
