"""A tiny InternVL (``internvl``, as InternVL3-hf): an InternViT tower (16 px tiles, patch 4, CLS dropped),
pixel-shuffled 2x2 to 4 tokens per tile, and a Qwen2 decoder.

The image processor (``GotOcr2ImageProcessor``, ``crop_to_patches``) cuts an image into 1-4 tiles of 16x16 on the
grid closest to its aspect ratio, plus a 16x16 thumbnail of the whole image when there is more than one tile:
a 48x48 image is 2x2 tiles + thumbnail = 5 tiles = 20 tokens, a 64x32 one 2x1 + thumbnail = 12 tokens. The prompt's
``<IMG_CONTEXT>`` (the processor's ``image_token``) becomes ``<img>`` + 4 x tiles x ``<IMG_CONTEXT>`` + ``</img>``.
The tokenizer carries the named tokens the processor reads (``start_image_token``, ``end_image_token``,
``context_image_token``, ``video_token``), and the processor needs its video processor."""

from __future__ import annotations

from pathlib import Path

import torch

from mmspec.tiny.common import finish, scale_linear, silence, word_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }} "
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT> {% elif c['type'] == "
            "'video' %}<video> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tokenizer():
    return word_tokenizer(SPECIALS + ["user", "assistant", "system"], ADDED, unk="<|endoftext|>", eos="<|im_end|>",
                          pad="<|endoftext|>", template=TEMPLATE,
                          extra={"start_image_token": "<img>", "end_image_token": "</img>",
                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def build(folder: Path, seed: int = 2, hidden: int = 48, layers: int = 2, vocab_pad: int = 7,
          max_tiles: int = 4) -> Path:
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor, InternVLVisionConfig, Qwen2Config)

    torch.manual_seed(seed)
    tok = tokenizer()
    tile, patch = 16, 4
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=[tile, tile], patch_size=[patch, patch])
    text = Qwen2Config(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       bos_token_id=None, tie_word_embeddings=False)
    per_tile = (tile // patch) ** 2 // 4            # pixel shuffle with downsample_ratio 0.5
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=per_tile,
                            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                            tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(config).eval()
    scale_linear([model.model.language_model, model.lm_head])
    scale_linear([model.model.multi_modal_projector], std=0.2)
    size = {"height": tile, "width": tile}
    image_proc = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=max_tiles)
    video_proc = InternVLVideoProcessor(size=size)
    processor = InternVLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                  image_seq_length=per_tile, chat_template=TEMPLATE)
    silence(model, [config.image_token_id])
    return finish(model, tok, folder, processor)
