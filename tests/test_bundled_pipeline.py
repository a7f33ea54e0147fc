"""mmspec on the bundled pair: greedy output equals the target's own generate() for every drafter kind."""

from __future__ import annotations

import pytest
import torch

import mmspec
from mmspec.pipeline import BUNDLED_VISUAL_DRAFTER
from vision.scenes import HELDOUT_SEEDS, KINDS, examples_for_scene

SEEDS = list(HELDOUT_SEEDS)[900:906]


@pytest.fixture(scope="module")
def pipes():
    text = mmspec.load(drafter_kind="text")
    out = {"text": text, "ngram": text.with_drafter_kind("ngram"), "none": text.with_drafter_kind("none")}
    out["visual"] = mmspec.load(drafter_kind="visual")
    out["eagle"] = mmspec.load()
    return out


def hf_greedy(pipe, image, prompt, max_new_tokens):
    inputs = pipe.processor(images=image, text=pipe.adapter.format_prompt(prompt), return_tensors="pt")
    with torch.inference_mode():
        out = pipe.target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_default_load_is_the_bundled_eagle_pair(pipes):
    pipe = pipes["eagle"]
    assert pipe.drafter_kind == "eagle" and type(pipe.target).__name__ == "LlavaForConditionalGeneration"
    assert pipes["text"].drafter_kind == "text"
    assert str(pipe.target.device) == "cpu"
    assert BUNDLED_VISUAL_DRAFTER.is_dir()


@pytest.mark.parametrize("kind", ["text", "visual", "eagle", "ngram", "none"])
def test_bundled_greedy_equals_target_generate(pipes, kind):
    pipe = pipes[kind]
    for i, seed in enumerate(SEEDS):
        ex = examples_for_scene(seed, kinds=(("caption",) if i % 2 == 0 else (KINDS[1 + i % 4],)))[0]
        expected = hf_greedy(pipe, ex.image, ex.prompt, 48)
        res = pipe.generate(ex.image, ex.prompt, max_new_tokens=48)
        assert res.token_ids == expected, (kind, seed, ex.prompt)
