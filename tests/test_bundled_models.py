"""The bundled default target (LLaVA) and text drafter load offline and work."""

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors import safe_open

from vision.scenes import bundled_paths, is_correct, make_examples, HELDOUT_SEEDS

TARGET, DRAFTER = bundled_paths()
PROMPT = "USER: <image>\nWhat color is the circle? ASSISTANT:"


@pytest.fixture(scope="module")
def target():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(TARGET)
    model = AutoModelForImageTextToText.from_pretrained(TARGET, dtype=torch.float32).eval()
    return model, processor


@pytest.fixture(scope="module")
def drafter():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(DRAFTER, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(DRAFTER))


def test_files_and_sizes():
    total = 0
    for folder in (TARGET, DRAFTER):
        for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"):
            assert (folder / name).is_file(), folder / name
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        with safe_open(folder / "model.safetensors", "pt") as f:
            for k in f.keys():
                assert f.get_slice(k).get_dtype() in ("F16", "BF16"), k
    assert (TARGET / "processor_config.json").is_file()
    assert total <= 40 * 2**20


def test_target_is_llava(target):
    model, processor = target
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    n = sum(p.numel() for p in model.parameters())
    assert 12e6 <= n <= 20e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tok = processor.tokenizer
    gc = model.generation_config
    assert gc.eos_token_id == tok.convert_tokens_to_ids("</s>") == tok.eos_token_id
    assert gc.pad_token_id == tok.pad_token_id is not None


def test_chat_template_and_processor(target):
    model, processor = target
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert prompt == PROMPT
    ex = make_examples(0, 1)[0]
    inputs = processor(images=ex.image, text=prompt, return_tensors="pt")
    img_id = model.config.image_token_id
    n_img = int((inputs["input_ids"] == img_id).sum())
    vc = model.config.vision_config
    assert n_img == (vc.image_size // vc.patch_size) ** 2  # one placeholder per patch (CLS dropped)
    assert inputs["pixel_values"].shape[-2:] == (72, 72)
    assert inputs["input_ids"][0, 0].item() == processor.tokenizer.bos_token_id
    text = processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert "What color is the circle?" in text


@pytest.fixture(scope="module")
def heldout_answers(target):
    model, processor = target
    tok = processor.tokenizer
    tok.padding_side = "left"
    exs = make_examples(0, 60)  # held-out scene seeds 0..59, all five prompt kinds
    assert all(e.seed in HELDOUT_SEEDS for e in exs)
    conv = lambda p: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
    texts = [processor.apply_chat_template(conv(e.prompt), add_generation_prompt=True, tokenize=False)
             for e in exs]
    inputs = processor(images=[e.image for e in exs], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    return exs, tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_heldout_answers_well_formed(heldout_answers):
    """Greedy answers are in the answer language of their prompt type."""
    from vision.scenes import COLORS, COUNT_WORDS, POSITIONS, SHAPES, SIZES

    obj = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at ({'|'.join(POSITIONS)})"
    caption = re.compile(rf"{obj}((, {obj})* and {obj})?\.")
    for e, a in zip(*heldout_answers):
        a = a.strip()
        if e.kind == "caption":
            assert caption.fullmatch(a), a
        elif e.prompt.startswith("How many"):
            assert a in COUNT_WORDS, a
        elif e.kind == "color":
            assert a in COLORS, a
        elif e.kind == "position":
            assert a in POSITIONS, a
        elif e.kind == "yesno":
            assert a in ("yes", "no"), a


def test_heldout_accuracy(heldout_answers):
    exs, answers = heldout_answers
    correct = sum(is_correct(a, e) for a, e in zip(answers, exs))
    assert correct / len(exs) >= 0.9, list(zip(answers, [e.answer for e in exs]))


def test_drafter_shares_tokenizer(target, drafter):
    _, processor = target
    dmodel, dtok = drafter
    ttok = processor.tokenizer
    assert dtok.get_vocab() == ttok.get_vocab()
    assert dtok.all_special_tokens == ttok.all_special_tokens
    assert dtok(PROMPT)["input_ids"] == ttok(PROMPT)["input_ids"]
    assert dtok.chat_template == ttok.chat_template
    assert type(dmodel).__name__ == "LlamaForCausalLM"
    assert dmodel.config.vocab_size == model_vocab(target)
    assert dmodel.generation_config.eos_token_id == ttok.eos_token_id


def model_vocab(target):
    return target[0].config.text_config.vocab_size


def test_drafter_runs_on_image_free_prompt(target, drafter):
    model, processor = target
    dmodel, _ = drafter
    ex = make_examples(2, 1)[0]  # a count question
    inputs = processor(images=ex.image, text=PROMPT.replace("What color is the circle?", ex.prompt),
                       return_tensors="pt")
    ids = [t for t in inputs["input_ids"][0].tolist() if t != model.config.image_token_id]
    with torch.no_grad():
        logits = dmodel(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), dmodel.config.vocab_size)
    assert torch.isfinite(logits).all()
    # the drafter has learned the answer format of this prompt type: a count word comes first
    nxt = processor.tokenizer.convert_ids_to_tokens(int(logits[0, -1].argmax()))
    assert nxt in ("one", "two", "three", "four")


def test_sample_images():
    from vision.scenes import ROOT

    folder = ROOT / "assets" / "images"
    meta = json.loads((folder / "answers.json").read_text())
    assert len(meta) >= 12
    for m in meta:
        assert (folder / m["file"]).is_file()
        assert m["seed"] in HELDOUT_SEEDS and m["caption"]
