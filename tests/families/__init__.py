"""Tiny offline fixtures of more VLM families (issue 26): Qwen3-VL (dense and MoE), Gemma 3, Mistral 3 (Pixtral),
InternVL, GLM-4V, Qwen3.5 and Llama 4. Each module exposes ``build(folder, **options) -> folder``: a folder that
``AutoProcessor.from_pretrained`` and ``AutoModelForImageTextToText.from_pretrained`` load back, built from a
config with random weights (scaled so greedy output is varied and depends on the image). No downloads.

What an engine that drives these decoders itself must know is written down in ``NOTES.md`` next to this file;
``check_generate.py`` builds every family and runs transformers' own ``generate()`` on it.
"""

FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "gemma3", "mistral3", "internvl", "glm4v", "qwen3_5", "llama4")


def builder(family: str):
    """The ``build`` function of ``family`` (``qwen3_vl_moe`` is ``qwen3_vl.build`` with ``moe=True``)."""
    import functools
    import importlib

    if family == "qwen3_vl_moe":
        from tests.families import qwen3_vl

        return functools.partial(qwen3_vl.build, moe=True)
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; one of {FAMILIES}")
    return importlib.import_module(f"tests.families.{family}").build
