"""A tiny Qwen3-VL (``qwen3_vl``; ``moe=True``: ``qwen3_vl_moe``): interleaved M-RoPE, a learned vision position
grid (square: 8x8 entries) and DeepStack (features of vision layers added to the first decoder layers' hidden
states at the image positions, scaled up here so that losing them changes most outputs). Patch 4, merge 2: one
image token per 8x8 pixels, so the token count depends on the image size."""

from __future__ import annotations

from pathlib import Path

import torch

from mmspec.tiny.common import QWEN_ADDED, QWEN_TEMPLATE, finish, qwen_tokenizer, scale_linear, silence


def build(folder: Path, moe: bool = False, seed: int | None = None, hidden: int = 48, layers: int = 2,
          vocab_pad: int = 7, deepstack_std: float = 0.3, lm_std: float = 0.2) -> Path:
    """``deepstack_std``: the DeepStack mergers' weights (0.3: dropping DeepStack changes every tiny output);
    ``lm_std``: the decoder's and lm_head's weights."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    torch.manual_seed((0 if moe else 1) if seed is None else seed)   # seeds with varied, image-dependent output
    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_ADDED}
    heads, head_dim = 4, hidden // 4
    third = head_dim // 2 // 3
    section = [head_dim // 2 - 2 * third, third, third]      # sums to head_dim / 2 (interleaved T/H/W)
    text = dict(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
                max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                 "mrope_interleaved": True},
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    if moe:
        from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration as cls

        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
        config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **common)
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration as cls

        config = Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    model = cls(config).eval()
    scale_linear([model.model.language_model, model.lm_head], std=lm_std)
    if moe:   # the experts are 3-D parameters [experts, ...]
        with torch.no_grad():
            for name, p in model.model.language_model.named_parameters():
                if "experts" in name and p.dim() == 3:
                    p.normal_(0, lm_std)
    # the image features and the DeepStack additions on the scale of the decoder's hidden states (norms ~50 after
    # the scaling above; the default init gives the mergers' outputs norms ~0.5, which would change nothing)
    scale_linear([model.model.visual.merger])
    scale_linear(model.model.visual.deepstack_merger_list, std=deepstack_std)
    size = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    image_proc = Qwen2VLImageProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    video_proc = Qwen3VLVideoProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                 chat_template=QWEN_TEMPLATE)
    silence(model, [ids["<|image_pad|>"], ids["<|video_pad|>"]])
    return finish(model, tok, folder, processor)
