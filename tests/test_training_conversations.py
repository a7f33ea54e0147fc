"""``mmspec train-drafter --data`` with requests of several images, none, and conversations (issue 28).

A JSONL holding a two-image row, a two-turn conversation (an image in each user turn, paths relative to the JSONL's
folder), text-only rows (a conversation and ``"images": []``), a single-image row and a conversation whose image is
missing trains an eagle head and a visual drafter on a tiny Qwen3-VL target (4 decoder layers: an EAGLE-3 head reads
three). Each row's distillation label is the target's greedy answer to the whole request (``generate()`` on
``apply_chat_template``); the row with the missing image is skipped with its line number; the drafters then load and
draft losslessly on those conversations, alone and batched. Malformed rows are refused with their line number
before anything is written, as single-image rows are.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import mmspec
from mmspec.cli import main
from mmspec.tiny import build_tiny
from tests.tiny import sample_image
from tests.tiny_families import PROMPTS, hf_chat, user

MAX_NEW = 6


def _image(path: str) -> dict:
    return {"type": "image", "path": path}


def rows() -> list[dict]:
    """The --data rows (line n + 1 is rows()[n]); images relative to the JSONL's folder."""
    return [
        {"images": ["img0.png", "sub/img1.png"], "prompt": PROMPTS[0]},
        {"messages": [user(_image("img0.png"), PROMPTS[1]), {"role": "assistant", "content": "red circle"},
                      user({"type": "image", "image": "sub/img1.png"}, PROMPTS[0])]},
        {"messages": [{"role": "user", "content": PROMPTS[1]}]},
        {"images": [], "prompt": PROMPTS[0]},
        {"image": "img2.png", "prompt": PROMPTS[1]},
        {"messages": [user(_image("missing.png"), PROMPTS[1])]},
    ]


def as_conversation(row: dict, folder) -> list[dict]:
    """The request a row stands for, as a conversation with its images loaded (the reference's input)."""
    from PIL import Image

    def load(p):
        return Image.open(folder / p).convert("RGB")

    if "messages" in row:
        return [dict(m, content=[dict((k, load(v) if k in ("path", "image") else v) for k, v in part.items())
                                 for part in m["content"]]) if isinstance(m["content"], list) else m
                for m in row["messages"]]
    images = row.get("images", [row.get("image")] if "image" in row else [])
    return [user(*[load(p) for p in images], row["prompt"])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-conv")
    target = build_tiny("qwen3_vl", root / "target", layers=4)
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    for i, name in enumerate(["img0.png", "sub/img1.png", "img2.png"]):
        sample_image(i, 40).save(data / name)
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()))
    base = mmspec.load(str(target), drafter=None, drafter_kind="none")
    return root, target, data, base


def train(target, data, out, kind: str, *extra) -> int:
    return main(["train-drafter", "--kind", kind, "--target", str(target), "--drafter", "none", "--drafter-kind",
                 "none", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2",
                 "--max-new-tokens", str(MAX_NEW), "--heldout", "1", "--save-dtype", "float32", *extra])


@pytest.mark.parametrize("kind", ["eagle", "visual"])
def test_trains_on_several_images_conversations_and_text_only(setup, kind, capsys):
    from mmspec.training.data import read_examples

    root, target, data, base = setup
    jsonl = data / "data.jsonl"
    _, held = read_examples(type("Args", (), dict(data=str(jsonl), target=str(target), prompt=["x"], heldout=1)))
    held_line = int(held[0].name.rsplit(" ", 1)[1])
    assert held_line not in (1, 2, 6)   # the new shapes and the missing image are among the training rows
    out = root / kind
    extra = ["--num-visual-tokens", "2", "--hidden-size", "32", "--num-layers", "1"] if kind == "visual" else []
    capsys.readouterr()
    assert train(target, jsonl, out, kind, *extra) == 0
    log = capsys.readouterr().out
    assert re.search(rf"skipping {re.escape(str(jsonl))} line 6: messages\[0\]\.content\[0\].*not found", log), log
    report = json.loads((out / "train_report.json").read_text())
    assert report["train_examples"] == 4 and report["outputs_differing_from_target"] == 0

    # each row's label: the target's greedy answer to the whole request
    distilled = {r["name"]: r for shard in sorted((out / "distill").rglob("shard_*.pt"))
                 for r in torch.load(shard, weights_only=False)}
    assert len(distilled) == 4
    for name, r in distilled.items():
        n = int(name.rsplit(" ", 1)[1])
        conv = as_conversation(rows()[n - 1], data)
        ids = base.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"][0].tolist()
        expected = hf_chat(base, conv, MAX_NEW)
        if kind == "eagle":
            assert r["ids"] == ids + expected and r["prompt_len"] == len(ids), n
        else:
            assert r["answer"] == expected, n
            assert ("pooled" in r) == (n in (1, 2, 5)), n     # text-only rows get no visual tokens

    # the drafter loads by its folder and drafts losslessly on the same shapes, alone and batched
    pipe = mmspec.load(str(target), drafter=str(out), drafter_kind=None if kind == "eagle" else kind)
    assert pipe.drafter_kind == kind
    convs = [as_conversation(rows()[i], data) for i in (0, 1, 2, 4)]
    expected = [hf_chat(base, conv, 12) for conv in convs]
    for conv, exp in zip(convs, expected):
        assert pipe.chat(conv, max_new_tokens=12, num_draft_tokens=3).token_ids == exp
    results = pipe.generate_batch(convs, batch_size=3, max_new_tokens=12, num_draft_tokens=3)
    assert [r.token_ids for r in results] == expected


GOOD = json.dumps({"image": "img0.png", "prompt": PROMPTS[0]})


@pytest.mark.parametrize("line,message", [
    (json.dumps({"messages": [user(PROMPTS[0]), {"role": "assistant", "content": "x"}]}),
     r"messages\[1\]: the conversation ends on a assistant turn"),
    (json.dumps({"messages": [{"role": "assistant", "content": [_image("img0.png")]}, user(PROMPTS[0])]}),
     r"messages\[0\]\.content\[0\]: images belong in user turns"),
    (json.dumps({"messages": []}), "the conversation is empty"),
    (json.dumps({"messages": [user({"type": "image"}, PROMPTS[0])]}), r"messages\[0\]\.content\[0\]: an image part"),
    (json.dumps({"messages": [user(PROMPTS[0])], "prompt": "hi"}), 'takes no "prompt"'),
    (json.dumps({"images": "img0.png"}), '"images" must be an array of image file paths.*got a string'),
    (json.dumps({"images": ["img0.png", 3]}), '"images" must be an array'),
    (json.dumps({"images": []}), '"images" is empty.*needs a "prompt"'),
    (json.dumps({"image": "img0.png", "messages": [user(PROMPTS[0])]}), 'give one of.*not image and messages'),
    (json.dumps({"prompt": "hi"}), 'has no "image".*"images" or "messages"'),
])
def test_bad_rows_are_refused_with_their_line(setup, tmp_path, capsys, line, message):
    root, target, data, _ = setup
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join([GOOD, GOOD, line, GOOD]) + "\n")
    (tmp_path / "img0.png").write_bytes((data / "img0.png").read_bytes())
    out = tmp_path / "out"
    assert train(target, jsonl, out, "eagle") == 2
    err = capsys.readouterr().err
    assert "line 3" in err and re.search(message, err) and "Traceback" not in err, err
    assert not out.exists()
