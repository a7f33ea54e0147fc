"""Drafters trained on video conversations (issue 28): ``mmspec train-drafter --data`` with JSONL rows holding
video parts (frames as image files relative to the JSONL) beside an image row trains a ``visual`` drafter and an
``eagle`` head on a tiny Qwen2-VL target (4 decoder layers: an EAGLE-3 head reads three).

Each video row's label is the target's greedy answer to the whole conversation; the visual drafter's rows with a
clip get visual tokens. Both drafters then load by their folder and give, for a clip alone and a clip with an
image, the target's own ``generate()`` on ``apply_chat_template`` token for token, alone and batched with an image
row. Tiny random models, float32, offline.
"""

from __future__ import annotations

import json

import pytest
import torch

import mmspec
from mmspec.cli import main
from tests.test_video import clip, hf_chat, shapes, user
from tests.tiny import sample_image
from tests.tiny_families import build_tiny_qwen_vl

MAX_NEW = 6
CHECK_NEW = 10
IMAGE_ROW = ("img.png", "what color is the circle ?")


def _frames(folder, name: str, frames) -> list[str]:
    """``frames`` saved (PNG, lossless) under ``folder/name/``; their paths relative to ``folder``."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        frame.save(folder / name / f"f{i}.png")
        paths.append(f"{name}/f{i}.png")
    return paths


def _as_files(conv: list[dict], folder, tag: str) -> list[dict]:
    """``conv`` (from ``shapes()``) with its images and clips' frames written under ``folder``, as file paths."""
    out = []
    for t, m in enumerate(conv):
        parts = []
        for p, part in enumerate(m["content"]):
            if part["type"] == "video":
                part = {"type": "video", "video": _frames(folder, f"{tag}-{t}-{p}", part["video"])}
            elif part["type"] == "image":
                name = f"{tag}-{t}-{p}.png"
                part["image"].save(folder / name)
                part = {"type": "image", "path": name}
            parts.append(part)
        out.append(dict(m, content=parts))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-drafters")
    target = build_tiny_qwen_vl(root / "target", version="2", layers=4)
    data = root / "data"
    data.mkdir()
    sample_image(3, 40).save(data / IMAGE_ROW[0])
    rows = [{"messages": _as_files(conv, data, name.replace(" ", "_"))} for name, conv in shapes().items()]
    rows.append({"messages": [user({"type": "video", "video": _frames(data, "more", clip(9, n=2, size=24))},
                                   "what color is the circle ?")]})
    rows.append({"image": IMAGE_ROW[0], "prompt": IMAGE_ROW[1]})
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = mmspec.load(str(target), drafter=None, drafter_kind="none")
    return root, target, data, base, rows


def train(target, data, out, kind: str, *extra) -> int:
    return main(["train-drafter", "--kind", kind, "--target", str(target), "--drafter", "none", "--drafter-kind",
                 "none", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2",
                 "--max-new-tokens", str(MAX_NEW), "--heldout", "1", "--save-dtype", "float32", *extra])


def _loaded(row: dict, folder) -> list[dict]:
    """A --data row as the conversation it stands for, its files read (the reference's input)."""
    from PIL import Image

    def load(p):
        return Image.open(folder / p).convert("RGB")

    if "image" in row:
        return [user(load(row["image"]), row["prompt"])]
    return [dict(m, content=[{"type": "video", "video": [load(f) for f in part["video"]]} if part["type"] == "video"
                             else {"type": "image", "image": load(part["path"])} if part["type"] == "image" else part
                             for part in m["content"]])
            for m in row["messages"]]


@pytest.mark.parametrize("kind", ["visual", "eagle"])
def test_drafter_trained_on_video_rows_equals_generate(setup, kind):
    root, target, data, base, rows = setup
    out = root / kind
    extra = ["--num-visual-tokens", "2", "--hidden-size", "32", "--num-layers", "1"] if kind == "visual" else []
    assert train(target, data / "data.jsonl", out, kind, *extra) == 0
    report = json.loads((out / "train_report.json").read_text())
    assert report["train_examples"] == len(rows) - 1 and report["outputs_differing_from_target"] == 0

    # each row's label: the target's greedy answer to the whole conversation, clips included
    distilled = [r for shard in sorted((out / "distill").rglob("shard_*.pt"))
                 for r in torch.load(shard, weights_only=False)]
    assert len(distilled) == len(rows) - 1
    for r in distilled:
        conv = _loaded(rows[int(r["name"].rsplit(" ", 1)[1]) - 1], data)
        ids = base.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"][0].tolist()
        expected = hf_chat(base, conv, MAX_NEW)
        if kind == "eagle":
            assert r["ids"] == ids + expected and r["prompt_len"] == len(ids), r["name"]
        else:
            assert r["answer"] == expected and "pooled" in r, r["name"]   # every row has a clip or an image

    # the drafter loads by its folder and drafts losslessly on video conversations, alone and batched
    pipe = mmspec.load(str(target), drafter=str(out), drafter_kind=None if kind == "eagle" else kind)
    assert pipe.drafter_kind == kind and pipe.adapter.takes_video
    convs = shapes()
    checks = {name: convs[name] for name in ("video", "video and image", "two turns")}
    expected = {name: hf_chat(base, conv, CHECK_NEW) for name, conv in checks.items()}
    assert len({tuple(e) for e in expected.values()}) == len(expected)   # answers that tell the shapes apart
    for name, conv in checks.items():
        res = pipe.chat(conv, max_new_tokens=CHECK_NEW, num_draft_tokens=3)
        assert res.token_ids == expected[name], (kind, name, res.rounds)
        assert any(r.draft_ids for r in res.rounds), (kind, name)   # the drafter drafted
    if kind == "visual":   # the clip reaches the drafter: visual tokens that depend on its frames
        def tokens(frames):
            request = pipe._job([user(frames, "describe the image .")], None, dict(max_new_tokens=1)).request
            pipe.adapter.image_features(request)
            return pipe.strategy.prefix_embeds(request)

        a, b = tokens(clip(1)), tokens(clip(2))
        assert a is not None and a.shape[1] == 2 and not torch.equal(a, b)
    image = sample_image(3, 40)
    image_ref = hf_chat(base, [user(image, IMAGE_ROW[1])], CHECK_NEW)
    results = pipe.generate_batch([checks["video"], image, checks["video and image"], checks["two turns"]],
                                  [None, IMAGE_ROW[1], None, None], batch_size=3, max_new_tokens=CHECK_NEW,
                                  num_draft_tokens=3)
    got = [r.token_ids for r in results]
    assert all(r.error is None for r in results), [r.error for r in results]
    assert got == [expected["video"], image_ref, expected["video and image"], expected["two turns"]]
