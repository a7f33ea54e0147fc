"""A tiny Qwen3.5 (``qwen3_5``): a hybrid decoder of Gated DeltaNet linear-attention layers (a causal conv state
and a recurrent state per layer, no KV) and gated full-attention layers with interleaved M-RoPE on a quarter of
each head, behind a Qwen3-VL-like vision side (patch 4, merge 2, learned 8x8 position grid, no DeepStack). The
processor is ``Qwen3VLProcessor`` (with its video processor); it returns ``mm_token_type_ids``.

transformers reloads this family's tokenizer as ``Qwen3_5Tokenizer`` (a byte-level BPE with Qwen3.5's own
pre-tokenizer) whatever the folder says, so a WordLevel vocabulary would come back as garbage: the tokenizer here
is a small byte-level BPE trained in memory with that pre-tokenizer, built as a ``Qwen3_5Tokenizer``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmspec.tiny.common import bpe_tokenizer, finish, scale_linear, silence

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
            "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer(vocab_size: int = 400):
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX, Qwen3_5Tokenizer

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    model = json.loads(bpe_tokenizer(SPECIALS, pre, vocab_size=vocab_size).to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen3_5Tokenizer(vocab=model["vocab"], merges=merges, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                           pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.chat_template = TEMPLATE
    return tok


def build(folder: Path, seed: int = 0, hidden: int = 48, layer_types: tuple[str, ...] | None = None,
          vocab_pad: int = 7, merger_std: float = 0.5, rotary_factor: float = 0.25) -> Path:
    """``layer_types``: default linear, full, linear (Qwen3.5 itself: three linear then one full, repeated).
    ``rotary_factor``: the share of each full-attention head that is rotated (0.25, as Qwen3.5: 6 of 24 dims, one
    frequency per axis; 1.0: 4 frequencies per axis, so that positions weigh more in a tiny model)."""
    from transformers import (Qwen2VLImageProcessor, Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor,
                              Qwen3VLVideoProcessor)

    torch.manual_seed(seed)
    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    layer_types = list(layer_types or ("linear_attention", "full_attention", "linear_attention"))
    head_dim = 24                                     # partial_rotary_factor 0.25: 6 rotary dims, 3 frequencies
    per_axis = int(head_dim * rotary_factor) // 6     # interleaved T/H/W: the frequencies split evenly
    text = dict(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=len(layer_types), layer_types=layer_types, num_attention_heads=4,
                num_key_value_heads=2, head_dim=head_dim, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": rotary_factor, "mrope_section": [per_axis] * 3,
                                 "mrope_interleaved": True},
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    config = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    scale_linear([model.model.language_model, model.lm_head])
    scale_linear([model.model.visual.merger], std=merger_std)
    size = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    kw = dict(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok,
                                 video_processor=Qwen3VLVideoProcessor(**kw), chat_template=TEMPLATE)
    silence(model, [ids["<|image_pad|>"], ids["<|video_pad|>"]])
    return finish(model, tok, folder, processor, eos_ids=[ids["<|im_end|>"], ids["<|endoftext|>"]])
