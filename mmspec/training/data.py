"""Step 1 of ``mmspec train-drafter``, the self-distillation data: the examples (the bundled world's scenes, a
folder of images, or a JSONL of rows: one image, several, none, or a conversation; ``ROW_FORMATS``), and the
target's answers to them with what the drafter learns from, written to ``OUT/distill/`` in shards, so an
interrupted run keeps what it computed."""

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

# the --data JSONL rows (``train-drafter --help`` and the docs say the same)
ROW_FORMATS = ('{"image": "a.png", "prompt": "..."}, {"images": ["a.png", "b.png"], "prompt": "..."} ("images": [] '
               'for text only), or {"messages": [...]}, a conversation in transformers\' chat-message format ending '
               'on a user turn')
# the keys of an image or video part that hold its source (``mmspec.conversation``)
SOURCE_KEYS = ("image", "video", "url", "path", "base64")


@dataclass
class Example:
    """One request, as ``Pipeline.generate(image, prompt)`` takes it: ``image`` one image (path or PIL.Image), a
    list of them or None; or, with ``prompt`` None, a conversation."""

    image: object
    prompt: str | None
    name: str


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def _kind(value) -> str:
    return {list: "an array", str: "a string", dict: "an object", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _beside(value: str, folder: Path) -> str:
    """An image path from a --data JSONL row: a relative one is relative to the JSONL's folder; URLs unchanged."""
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif value.startswith("data:") or "://" in value:
        return value
    path = Path(value)
    return str(path if path.is_absolute() else folder / path)


def _map_parts(messages, fn):
    """``messages`` with every image or video part replaced by ``fn(part)``; anything else as given, for
    ``parse_conversation`` to judge."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            m = dict(m, content=[fn(p) if isinstance(p, dict) and p.get("type") in ("image", "video") else p
                                 for p in m["content"]])
        out.append(m)
    return out


def _resolved(messages, folder: Path):
    """A conversation with its image (and video) parts' relative paths relative to ``folder``."""
    def resolve(value):
        if isinstance(value, list):   # a clip's frames
            return [resolve(v) for v in value]
        return _beside(value, folder) if isinstance(value, str) else value

    return _map_parts(messages, lambda part: {k: resolve(v) if k in ("image", "video", "url", "path") else v
                                              for k, v in part.items()})


def _check_conversation(messages, where: str) -> None:
    """The conversation's structure, checked by ``parse_conversation`` with every image or video source replaced
    by a stand-in image: the images are read when the row is answered, where one that cannot be read skips the row
    (as for single-image rows), and a large --data is checked without decoding it."""
    from PIL import Image

    from mmspec.conversation import parse_conversation

    stand_in = Image.new("RGB", (1, 1))

    def standing_in(part):
        if not any(part.get(k) is not None for k in SOURCE_KEYS):
            return part      # no source at all: parse_conversation says so
        kind = part["type"]
        return dict({k: v for k, v in part.items() if k not in SOURCE_KEYS},
                    **{kind: stand_in if kind == "image" else [stand_in]})

    try:
        parse_conversation(_map_parts(messages, standing_in))
    except MMSpecError as e:
        raise MMSpecError(f"{where}: {e}", code=e.code, param=e.param) from None


def _jsonl_row(line: str, where: str, folder: Path, default_prompt: str) -> tuple[object, str | None]:
    """One --data JSONL row -> (image, prompt) as ``Pipeline.generate`` takes them (``Example``):
    ``{"image": path, "prompt"?}``, ``{"images": [path, ...], "prompt"?}`` (``[]`` and a prompt: text only), an
    image row without a prompt taking ``default_prompt``; or ``{"messages": [...]}`` (prompt None). Relative image
    paths are relative to ``folder``. Anything else is refused with its line number."""
    try:
        row = json.loads(line)
    except ValueError as e:
        raise MMSpecError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise MMSpecError(f"{where}: expected a JSON object like {{\"image\": \"a.png\", \"prompt\": \"...\"}}, "
                          f"got {_kind(row)}")
    given = [k for k in ("image", "images", "messages") if k in row]
    if not given:
        raise MMSpecError(f"{where}: the object has no \"image\" (an image file path), \"images\" or \"messages\"; "
                          f"a row is one of {ROW_FORMATS}")
    if len(given) > 1:
        raise MMSpecError(f"{where}: give one of \"image\", \"images\" or \"messages\", not {' and '.join(given)}")
    prompt = row.get("prompt")
    if "messages" in row:
        if prompt is not None:
            raise MMSpecError(f"{where}: a \"messages\" row asks its last user turn; it takes no \"prompt\"")
        messages = _resolved(row["messages"], folder)
        _check_conversation(messages, where)
        return messages, None
    if prompt is not None and not isinstance(prompt, str):
        raise MMSpecError(f"{where}: \"prompt\" must be a string, got {_kind(prompt)}")
    if "images" in row:
        images = row["images"]
        if not isinstance(images, list) or not all(isinstance(p, str) and p.strip() for p in images):
            raise MMSpecError(f"{where}: \"images\" must be an array of image file paths (non-empty strings), got "
                              f"{_kind(images) if not isinstance(images, list) else 'an array holding something else'}")
        if not images and not (prompt or "").strip():
            raise MMSpecError(f"{where}: \"images\" is empty (a text-only row), so the row needs a \"prompt\"")
        return [_beside(p, folder) for p in images], prompt or default_prompt
    image = row["image"]
    if not isinstance(image, str) or not image.strip():
        raise MMSpecError(f"{where}: \"image\" must be an image file path (a non-empty string), got "
                          f"{_kind(image) if image != '' else 'an empty string'}")
    return _beside(image, folder), prompt or default_prompt


def read_examples(args) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples from --data, or from the bundled synthetic world by default."""
    if args.data is None:
        if args.target is not None:
            raise MMSpecError("--data is required with --target (a folder of images or a JSONL of requests)")
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
            image, prompt = _jsonl_row(line, f"--data {path}, line {n}", path.parent, args.prompt[0])
            examples.append(Example(image, prompt, f"{path} line {n}"))
    else:
        raise MMSpecError(f"--data {path} is neither a folder nor a JSONL file")
    if len(examples) < 2:
        raise MMSpecError(f"--data {path}: need at least 2 examples, found {len(examples)}")
    random.Random(0).shuffle(examples)
    n_held = min(args.heldout, max(1, len(examples) // 5))
    return examples[n_held:], examples[:n_held]


def target_answer(pipe, ex: Example, args):
    """(the target's greedy answer to the whole request, the request as the pipeline prepared it, with its image
    features), or None for a request the target cannot take (an unusable image, a prompt past its context)."""
    try:
        # prepared exactly as generate() prepares it: the chat template (a conversation's every turn), the
        # placeholders of every image, the pixel inputs
        request = pipe._job(ex.image, ex.prompt, {"max_new_tokens": args.max_new_tokens}).request
        res = pipe.generate(ex.image, ex.prompt, max_new_tokens=args.max_new_tokens)
    except MMSpecError as e:
        print(f"skipping {ex.name}: {e}")
        return None
    pipe.adapter.image_features(request)
    return res, request


def distill_example(pipe, ex: Example, args, pool_m: int | None) -> dict | None:
    """The target's greedy answer and its top-K distributions along it, and (visual) the request's pooled source
    features, none for a text-only request, which the visual drafter reads without visual tokens (None if the
    target cannot take the request)."""
    import torch   # here, not at the top: ``train-drafter --help`` stays free of torch

    from mmspec.drafters.visual import VisualDrafter
    from mmspec.targets.batch import TargetSession

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
        encoder = None
        if args.visual_source == "open_clip":
            from vision.openclip import OpenClipEncoder

            encoder = OpenClipEncoder.get(args.open_clip_model, args.open_clip_pretrained, adapter.device)
        if VisualDrafter.sees(request, encoder):
            row["pooled"] = VisualDrafter.pool(adapter, request, pool_m, encoder).half().cpu()
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

