"""A tiny GLM-4V (``glm4v``, as GLM-4.1V-Thinking): a Qwen2-VL-like vision side (patch 4, 2x2 merge by a strided
conv: one image token per 8x8 pixels) and a GLM-4 decoder with 3-D M-RoPE on half of each head
(``partial_rotary_factor`` 0.5, ``mrope_section`` [2, 1, 1]).

The prompt names the image ``<|begin_of_image|><|image|><|end_of_image|>``; the processor repeats ``<|image|>``
once per image token. The processor needs its video processor and the ``<|begin_of_video|>`` /
``<|end_of_video|>`` tokens, and returns ``mm_token_type_ids`` (the model's 3-D positions need them). Generation
stops at any of three ids, as GLM-4.1V's: ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``. ``moe=True``:
``glm4v_moe`` (as GLM-4.5V: 4 routed experts, top 2, one shared expert, the first layer dense).

Video: the template renders a clip ``<|begin_of_video|><|video|><|end_of_video|>``, which the processor writes out
per temporal patch with its timestamp in whole seconds (the digits are in the vocabulary); its video processor
takes the given frames as the clip (``do_sample_frames=False``: a frames list has no fps to sample by)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmspec.tiny.common import finish, scale_linear, silence, word_tokenizer

SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
ADDED = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
         "<|video|>"]
DIGITS = [str(d) for d in range(10)]
TEMPLATE = ("[gMASK] <sop> {% for m in messages %}<|{{ m['role'] }}|> {% if m['content'] is string %}"
            "{{ m['content'] }} {% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<|begin_of_image|><|image|><|end_of_image|> {% elif c['type'] == 'video' %}"
            "<|begin_of_video|><|video|><|end_of_video|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tokenizer():
    tok = word_tokenizer(SPECIALS, ADDED, unk="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>",
                         template=TEMPLATE, extra={"image_token": "<|image|>", "video_token": "<|video|>"})
    tok.add_tokens(DIGITS)   # a clip's frame timestamps (whole seconds, right after ``<|end_of_image|>``)
    return tok


def build(folder: Path, seed: int = 11, hidden: int = 64, layers: int = 2, vocab_pad: int = 7,
          moe: bool = False) -> Path:
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    if moe:
        from transformers import Glm4vMoeConfig as Config, Glm4vMoeForConditionalGeneration as Model
    else:
        from transformers import Glm4vConfig as Config, Glm4vForConditionalGeneration as Model

    torch.manual_seed(seed)
    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS + ADDED}
    heads = 4
    rotary = hidden // heads // 2                     # partial_rotary_factor 0.5
    section = [rotary // 2 - 2 * (rotary // 4), rotary // 4, rotary // 4]  # sums to rotary / 2
    text = dict(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                 "partial_rotary_factor": 0.5},
                pad_token_id=tok.pad_token_id)
    if moe:
        text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, n_shared_experts=1,
                    first_k_dense_replace=1, n_group=1, topk_group=1)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, image_size=32,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden)
    config = Config(text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
                         video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                         image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                         video_end_token_id=ids["<|end_of_video|>"], tie_word_embeddings=False)
    model = Model(config).eval()
    scale_linear([model.model.language_model, model.lm_head])
    with torch.no_grad():   # fused experts are 3-D parameters [experts, ...]
        for p in model.model.language_model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.3)
    scale_linear([model.model.visual.merger], std=0.2)
    size = {"shortest_edge": 2 * 16 * 16, "longest_edge": 2 * 64 * 64}   # t x h x w, images count as 2 frames
    kw = dict(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    # the given frames are the clip (a frames list has no fps to sample by; GLM-4V's fps sampling refuses it)
    processor = Glm4vProcessor(image_processor=Glm4vImageProcessor(**kw), tokenizer=tok,
                               video_processor=Glm4vVideoProcessor(**kw, do_sample_frames=False),
                               chat_template=TEMPLATE)
    silence(model, [ids["<|image|>"], ids["<|video|>"]])
    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    return finish(model, tok, folder, processor, eos_ids=eos)
