"""Presets name real pairs by hub id and resolve to the right target adapter, HF class and drafter kind,
without downloading anything."""

from __future__ import annotations

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

import mmspec
from mmspec.drafters import drafter_class
from mmspec.errors import MMSpecError
from mmspec.presets import PRESETS, Preset, resolve_preset
from mmspec.targets import ADAPTERS

# hub ids exactly as the field uses them (shared/PAPERS.md)
EXPECTED = {
    "llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", "double7/vicuna-68m", "text", "LlavaForConditionalGeneration"),
    "llava-1.5-7b-llama68m": ("llava-hf/llava-1.5-7b-hf", "JackFram/llama-68m", "text",
                              "LlavaForConditionalGeneration"),
    "llava-1.6-13b": ("llava-hf/llava-v1.6-vicuna-13b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf", "vlm",
                      "LlavaNextForConditionalGeneration"),
    "llava-onevision-7b": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
                           "vlm", "LlavaOnevisionForConditionalGeneration"),
    "qwen2.5-vl-7b": ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct", "vlm",
                      "Qwen2_5_VLForConditionalGeneration"),
    "qwen2.5-vl-7b-text": ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "text",
                           "Qwen2_5_VLForConditionalGeneration"),
    "smolvlm2-2.2b": ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "vlm",
                      "SmolVLMForConditionalGeneration"),
}


def test_every_expected_pair_is_a_preset():
    assert set(EXPECTED) <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_resolves_to_class_adapter_and_kind(name):
    target, drafter, kind, hf_class = EXPECTED[name]
    p = resolve_preset(name)
    assert (p.target, p.drafter, p.drafter_kind) == (target, drafter, kind)
    # the family's HF class, as AutoModelForImageTextToText picks it for that model_type
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[p.family] == hf_class
    adapters = [cls for cls in ADAPTERS if p.family in cls.model_types]
    assert len(adapters) == 1
    cls = drafter_class(p.drafter_kind)
    assert cls.kind == kind and cls.needs_weights
    assert p.dtype in ("float16", "bfloat16") and "GB" in p.needs


def test_unknown_preset_is_an_mmspec_error():
    with pytest.raises(MMSpecError, match="unknown preset 'nope'"):
        mmspec.load(preset="nope")


def test_preset_of_an_unsupported_family_names_it(monkeypatch):
    monkeypatch.setitem(PRESETS, "future", Preset("org/future-vlm", "org/future-vlm-small", "vlm",
                                                  family="future_vlm"))
    with pytest.raises(MMSpecError, match="future_vlm"):
        mmspec.load(preset="future")


def test_preset_without_a_hub_fails_cleanly():
    # conftest sets HF_HUB_OFFLINE: nothing is downloaded, the missing checkpoint is an MMSpecError
    with pytest.raises(MMSpecError, match="cannot load the target"):
        mmspec.load(preset="smolvlm2-2.2b")
