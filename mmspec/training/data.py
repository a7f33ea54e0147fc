"""Step 1 of ``mmspec train-drafter``, the self-distillation data: the examples (the bundled world's scenes, a
folder of images, or a JSONL of image/prompt), and the target's answers to them with what the drafter learns
from, written to ``OUT/distill/`` in shards, so an interrupted run keeps what it computed."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmspec.errors import MMSpecError

if TYPE_CHECKING:
    import torch  # for annotations: functions import torch themselves, so `mmspec train-drafter --help` stays light

SHARD = 128


@dataclass
class Example:
    image: object          # path or PIL.Image
    prompt: str
    name: str


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def _kind(value) -> str:
    return {list: "an array", str: "a string", dict: "an object", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _jsonl_row(line: str, where: str) -> tuple[Path, str | None]:
    """One --data JSONL row -> (image path, prompt or None): a JSON object whose "image" is a non-empty string
    (a path) and whose optional "prompt" is a string; anything else is refused with its line number."""
    try:
        row = json.loads(line)
    except ValueError as e:
        raise MMSpecError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise MMSpecError(f"{where}: expected a JSON object like {{\"image\": \"a.png\", \"prompt\": \"...\"}}, "
                          f"got {_kind(row)}")
    if "image" not in row:
        raise MMSpecError(f"{where}: the object has no \"image\" (an image file path)")
    image, prompt = row["image"], row.get("prompt")
    if not isinstance(image, str) or not image.strip():
        raise MMSpecError(f"{where}: \"image\" must be an image file path (a non-empty string), got "
                          f"{_kind(image) if image != '' else 'an empty string'}")
    if prompt is not None and not isinstance(prompt, str):
        raise MMSpecError(f"{where}: \"prompt\" must be a string, got {_kind(prompt)}")
    return Path(image), prompt


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
            img, prompt = _jsonl_row(line, f"--data {path}, line {n}")
            img = img if img.is_absolute() else path.parent / img
            examples.append(Example(str(img), prompt or args.prompt[0], f"{img}:{prompt}"))
    else:
        raise MMSpecError(f"--data {path} is neither a folder nor a JSONL file")
    if len(examples) < 2:
        raise MMSpecError(f"--data {path}: need at least 2 examples, found {len(examples)}")
    random.Random(0).shuffle(examples)
    n_held = min(args.heldout, max(1, len(examples) // 5))
    return examples[n_held:], examples[:n_held]


def source_features(pipe, request, args) -> torch.Tensor:
    """Features the visual tokens are made from: the target's own (cached), or an open_clip embedding."""
    if args.visual_source == "open_clip":
        from vision.openclip import OpenClipEncoder

        enc = OpenClipEncoder.get(args.open_clip_model, args.open_clip_pretrained, pipe.adapter.device)
        return enc.features(request.image, pipe.adapter.vision_cache)[0]
    return pipe.adapter.spliced_features(request.features)


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
    import torch   # here, not at the top: ``train-drafter --help`` stays free of torch

    from mmspec.targets.batch import TargetSession
    from vision.compress import pool_tokens

    adapter = pipe.adapter
    got = target_answer(pipe, ex, args)
    if got is None:
        return None
    res, request = got
    answer = res.token_ids
    with torch.inference_mode():
        session = TargetSession(adapter, request)
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

