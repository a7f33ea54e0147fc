"""Known real target/drafter pairs (hub ids exactly as in the field's usage), for ``load(preset=...)``."""

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


PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset("llava-hf/llava-1.5-7b-hf", "double7/vicuna-68m", "text",
                           needs="~15 GB GPU memory in float16"),
    "llava-1.5-7b-llama68m": Preset("llava-hf/llava-1.5-7b-hf", "JackFram/llama-68m", "text",
                                    needs="~15 GB GPU memory in float16"),
}


def resolve_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise MMSpecError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
