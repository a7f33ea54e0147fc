"""Known real target/drafter pairs (hub ids exactly as in the field's usage), for ``load(preset=...)``.

Each preset names its target's ``model_type`` (``family``), so an unsupported family is refused with an
``MMSpecError`` before anything is downloaded. ``needs`` is what it takes to run, for the README table: weights in
the preset's dtype plus room for the KV cache and the image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmspec.errors import MMSpecError


@dataclass(frozen=True)
class Preset:
    target: str
    drafter: str | None
    drafter_kind: str
    dtype: str = "float16"
    needs: str = ""          # what it takes to run, for the README table
    family: str = "llava"    # the target's config.model_type (the drafter's too for kind "vlm")


PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset("llava-hf/llava-1.5-7b-hf", "double7/vicuna-68m", "text",
                           needs="~15 GB GPU memory in float16 (7.1B + 68M parameters)"),
    "llava-1.5-7b-llama68m": Preset("llava-hf/llava-1.5-7b-hf", "JackFram/llama-68m", "text",
                                    needs="~15 GB GPU memory in float16 (7.1B + 68M parameters)"),
    "llava-1.6-13b": Preset("llava-hf/llava-v1.6-vicuna-13b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf", "vlm",
                            family="llava_next",
                            needs="~45 GB GPU memory in float16 (13.4B + 7.1B parameters; up to 2,880 image "
                                  "tokens each); one 80 GB GPU, or device_map='auto' over two 24 GB+ GPUs"),
    "llava-onevision-7b": Preset("llava-hf/llava-onevision-qwen2-7b-ov-hf",
                                 "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "vlm", family="llava_onevision",
                                 needs="~20 GB GPU memory in float16 (8.0B + 0.9B parameters); a 24 GB GPU"),
    "qwen2.5-vl-7b": Preset("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct", "vlm", dtype="bfloat16",
                            family="qwen2_5_vl",
                            needs="~26 GB GPU memory in bfloat16 (8.3B + 3.8B parameters); a 40 GB GPU for "
                                  "large images"),
    "qwen2.5-vl-7b-text": Preset("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "text",
                                 dtype="bfloat16", family="qwen2_5_vl",
                                 needs="~18 GB GPU memory in bfloat16 (8.3B + 0.5B parameters); a 24 GB GPU"),
    "smolvlm2-2.2b": Preset("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
                            "vlm", dtype="bfloat16", family="smolvlm",
                            needs="~6 GB GPU memory in bfloat16 (2.2B + 0.26B parameters); runs on CPU too "
                                  "(~10 GB RAM in float32)"),
    # issue 26 (part A). Ids, parameter counts and vocabularies from the model cards and configs; checked on paper
    # only (no hub here): the adapters were tested on tiny random configs of each family (docs/FAMILIES.md).
    "qwen3-vl-8b": Preset("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-2B-Instruct", "vlm", dtype="bfloat16",
                          family="qwen3_vl",
                          needs="~24 GB GPU memory in bfloat16 (8.8B + 2.1B parameters, both 151,936-row "
                                "vocabularies); a 40 GB GPU for large images"),
    "qwen3-vl-8b-text": Preset("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-0.6B", "text", dtype="bfloat16",
                               family="qwen3_vl",
                               needs="~20 GB GPU memory in bfloat16 (8.8B + 0.6B parameters); a 24 GB GPU"),
    "qwen3-vl-30b-a3b": Preset("Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3-VL-2B-Instruct", "vlm",
                               dtype="bfloat16", family="qwen3_vl_moe",
                               needs="~70 GB GPU memory in bfloat16 (31B MoE with 3B active + 2.1B parameters); "
                                     "one 80 GB GPU"),
    "internvl3-8b": Preset("OpenGVLab/InternVL3-8B-hf", "OpenGVLab/InternVL3-1B-hf", "vlm", dtype="bfloat16",
                           family="internvl",
                           needs="~20 GB GPU memory in bfloat16 (7.9B + 0.9B parameters, Qwen2.5 language models "
                                 "with 151,674-token vocabularies); a 24 GB GPU"),
    "glm-4.1v-9b": Preset("zai-org/GLM-4.1V-9B-Thinking", None, "ngram", dtype="bfloat16", family="glm4v",
                          needs="~24 GB GPU memory in bfloat16 (10.3B parameters; no smaller GLM-4.1V exists, so "
                                "n-gram drafting, or an EAGLE head trained with `mmspec train-drafter --kind "
                                "eagle`); a 40 GB GPU for large images"),
    "mistral-small-3.1-24b": Preset("mistralai/Mistral-Small-3.1-24B-Instruct-2503", None, "ngram",
                                    dtype="bfloat16", family="mistral3",
                                    needs="~55 GB GPU memory in bfloat16 (24B parameters, 131,072-token Tekken "
                                          "vocabulary; no small Mistral 3 VLM shares it, so n-gram drafting or a "
                                          "trained EAGLE head); one 80 GB GPU"),
    # issue 26 (part B). Gemma 3 ids and sizes from the model cards; Qwen3.5 ids from the Qwen3.5 model list
    # (Qwen/Qwen3.5-0.8B ... -27B, MoE -35B-A3B and up; transformers >= 5.2); both checked on paper only (no hub
    # here): the adapters were tested on tiny random configs (docs/FAMILIES.md). bfloat16: Gemma 3 overflows float16.
    "gemma-3-4b": Preset("google/gemma-3-4b-it", "google/gemma-3-1b-it", "text", dtype="bfloat16", family="gemma3",
                         needs="~11 GB GPU memory in bfloat16 (4.3B + 1.0B parameters; 256 image tokens per image; "
                               "the 1B text model has 262,144 vocabulary rows, the 4B 262,208); a 16 GB GPU"),
    "gemma-3-12b": Preset("google/gemma-3-12b-it", "google/gemma-3-1b-it", "text", dtype="bfloat16",
                          family="gemma3",
                          needs="~28 GB GPU memory in bfloat16 (12.2B + 1.0B parameters); a 40 GB GPU"),
    "gemma-3-12b-vlm": Preset("google/gemma-3-12b-it", "google/gemma-3-4b-it", "vlm", dtype="bfloat16",
                              family="gemma3",
                              needs="~36 GB GPU memory in bfloat16 (12.2B + 4.3B parameters); a 48 GB GPU"),
    "qwen3.5-9b": Preset("Qwen/Qwen3.5-9B", "Qwen/Qwen3.5-0.8B", "vlm", dtype="bfloat16", family="qwen3_5",
                         needs="~22 GB GPU memory in bfloat16 (9B + 0.8B parameters, both natively multimodal; "
                               "chains only: linear-attention layers cannot verify trees); a 24 GB GPU"),
    "qwen3.5-27b": Preset("Qwen/Qwen3.5-27B", "Qwen/Qwen3.5-2B", "vlm", dtype="bfloat16", family="qwen3_5",
                          needs="~62 GB GPU memory in bfloat16 (27B + 2B parameters; chains only); one 80 GB GPU"),
    # issue 27: public EAGLE-3 heads (kind "eagle", layout read from the head's config). Ids and targets from the
    # heads' model cards / the vLLM, SGLang and SpecForge threads that name them; checked on paper only (no hub
    # here): the head code was tested on tiny heads in both layouts (tests/test_eagle3.py, docs/EAGLE3_FORMATS.md).
    "qwen2.5-vl-7b-eagle3": Preset("Qwen/Qwen2.5-VL-7B-Instruct", "Rayzl/qwen2.5-vl-7b-eagle3-sgl", "eagle",
                                   dtype="bfloat16", family="qwen2_5_vl",
                                   needs="~18 GB GPU memory in bfloat16 (8.3B parameters + a ~0.4B one-layer "
                                         "EAGLE-3 head, SpecForge layout, 32,000-token draft vocabulary); a 24 GB GPU"),
    "qwen3-vl-235b-a22b-eagle3": Preset("Qwen/Qwen3-VL-235B-A22B-Instruct",
                                        "RedHatAI/Qwen3-VL-235B-A22B-Instruct-speculator.eagle3", "eagle",
                                        dtype="bfloat16", family="qwen3_vl_moe",
                                        needs="~480 GB GPU memory in bfloat16 (235B MoE with 22B active + a "
                                              "one-layer EAGLE-3 head, speculators layout); device_map='auto' "
                                              "over 8 x 80 GB GPUs"),
}


def supported_families() -> frozenset[str]:
    from mmspec.targets import ADAPTERS

    return frozenset(t for cls in ADAPTERS for t in cls.model_types)


def resolve_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise MMSpecError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    if preset.family not in supported_families():
        raise MMSpecError(f"preset {name!r} needs a target adapter for the {preset.family!r} family, which this "
                          f"build does not have; supported: {', '.join(sorted(supported_families()))}")
    return preset
