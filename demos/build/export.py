"""``export`` and ``images``: what the build ships under ``assets/``.

The target is written from the workdir's float32 checkpoint in 16-bit safetensors; a drafter is copied as
``mmspec train-drafter`` wrote it (already an HF folder in float16), without its distillation data and checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from demos.build.common import MODELS, ROOT, build_processor, set_generation_config
from vision import scenes

# ``export --what`` name -> folder, the same name in the workdir (where a distill stage writes it) and under
# assets/models; "drafter" is the text drafter (the name the recorded commands use)
# (``train-drafter --kind eagle`` trains EAGLE-3 heads: its stage exports eagle3-drafter; eagle-drafter, the default
# head in mmspec's first format, is copied as it is from a workdir that has one)
DRAFTER_FOLDERS = {"drafter": "text-drafter", "visual-drafter": "visual-drafter", "eagle-drafter": "eagle-drafter",
                   "eagle3-drafter": "eagle3-drafter"}
# train-drafter's data, resumable state and ownership marker (a shipped folder is not a run to resume)
NOT_SHIPPED = ("distill", "checkpoint.pt", "checkpoint.tmp", ".mmspec-output")


def _save_16bit(model, folder: Path, dtype=torch.float16):
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)


def copy_drafter(src: Path, dst: Path) -> list[str]:
    """The files of a trained drafter folder (not its data or checkpoint) into ``dst``; their names."""
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(f.name for f in src.iterdir() if f.is_file() and f.name not in NOT_SHIPPED)
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def cmd_export(args):
    """Copy trained models from the workdir into assets/models: the target in 16-bit safetensors, the drafters
    as their distill stage (``mmspec train-drafter``) exported them."""
    from transformers import LlavaForConditionalGeneration

    work = Path(args.workdir)
    src = work / "target_fp32"
    if src.exists() and args.what in ("all", "target"):
        processor = build_processor()
        m = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
        set_generation_config(m, processor.tokenizer)
        _save_16bit(m, MODELS / "target")
        processor.save_pretrained(MODELS / "target")
        print(f"exported target -> {MODELS / 'target'}")
    for what, folder in DRAFTER_FOLDERS.items():
        src = work / folder
        if (src / "model.safetensors").exists() and args.what in ("all", what):
            names = copy_drafter(src, MODELS / folder)
            print(f"exported {folder} -> {MODELS / folder} ({', '.join(names)})")


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
