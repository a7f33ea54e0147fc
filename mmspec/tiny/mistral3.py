"""A tiny Mistral 3 (``mistral3``, as Mistral-Small-3.1): a Pixtral tower (patch 4, 2-D RoPE, any image size up to
64 px) whose patches are merged 2x2 by the projector (one token per 8x8 pixels), and a Mistral decoder.

The processor is ``PixtralProcessor`` + ``PixtralImageProcessor``; it replaces the prompt's ``[IMG]`` with one row
of ``[IMG]`` tokens per 8 pixels of height, each row closed by ``[IMG_BREAK]`` and the last one by ``[IMG_END]``
instead. Only the ``[IMG]`` positions receive image features; the break and end tokens keep their own text
embeddings. Without ``mistral_common`` the tokenizer is saved and reloaded through the tokenizers backend."""

from __future__ import annotations

from pathlib import Path

import torch

from mmspec.tiny.common import finish, scale_linear, silence, word_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
ADDED = ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}[IMG] {% else %}{{ c['text'] }} {% endif %}{% endfor %}[/INST] "
            "{% else %}{% for c in m['content'] %}{{ c['text'] }} {% endfor %}{{ eos_token }} {% endif %}"
            "{% endfor %}")


def tokenizer():
    return word_tokenizer(SPECIALS, ADDED, unk="<unk>", bos="<s>", eos="</s>", pad="<pad>", template=TEMPLATE)


def build(folder: Path, seed: int = 2, hidden: int = 48, layers: int = 2, vocab_pad: int = 5,
          max_image: int = 64) -> Path:
    from transformers import (MistralConfig, Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor,
                              PixtralProcessor, PixtralVisionConfig)

    torch.manual_seed(seed)
    tok = tokenizer()
    patch, merge = 4, 2
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=max_image, patch_size=patch, head_dim=16)
    text = MistralConfig(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden // 4, max_position_embeddings=512, sliding_window=None,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    config = Mistral3Config(vision_config=vision, text_config=text,
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=merge,
                            vision_feature_layer=-1, tie_word_embeddings=False)
    model = Mistral3ForConditionalGeneration(config).eval()
    scale_linear([model.model.language_model, model.lm_head])
    scale_linear([model.model.multi_modal_projector], std=0.2)
    image_proc = PixtralImageProcessor(size={"longest_edge": max_image}, patch_size={"height": patch, "width": patch})
    processor = PixtralProcessor(image_processor=image_proc, tokenizer=tok, patch_size=patch,
                                 spatial_merge_size=merge, chat_template=TEMPLATE)
    silence(model, [config.image_token_id])
    return finish(model, tok, folder, processor)
