"""A tiny Llama 4 (``llama4``, as Llama-4-Scout): a vision tower over 16 px chunks (patch 4, pixel-shuffled to 4
tokens per chunk; up to 4 chunks plus a global view), and a MoE decoder with chunked-attention layers, NoPE
layers and attention temperature tuning.

The prompt's ``<|image|>`` becomes ``<|image_start|>`` + per chunk ``<|patch|>`` x 4 (separated by
``<|tile_x_separator|>`` / ``<|tile_y_separator|>``) + ``<|image|>`` + 4 x ``<|patch|>`` (the global view) +
``<|image_end|>``; the image features go to the ``<|patch|>`` positions (``image_token_index``).

Kept as a record: with transformers 5.24, ``generate()`` on this family fails (see ``NOTES.md``), so it is not a
target the engine can check itself against."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.families._common import finish, scale_linear, silence, word_tokenizer

SPECIALS = ["<unk>", "<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>"]
ADDED = ["<|header_start|>", "<|header_end|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
         "<|tile_x_separator|>", "<|tile_y_separator|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|header_start|> {{ m['role'] }} <|header_end|> "
            "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|image|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
            "<|eot|> {% endfor %}{% if add_generation_prompt %}<|header_start|> assistant <|header_end|> {% endif %}")


def tokenizer():
    return word_tokenizer(SPECIALS + ["user", "assistant", "system"], ADDED, unk="<unk>", bos="<|begin_of_text|>",
                          eos="<|eot|>", pad="<|finetune_right_pad|>", template=TEMPLATE)


def build(folder: Path, seed: int = 0, hidden: int = 48, layers: int = 4, vocab_pad: int = 5,
          attention_chunk_size: int = 16) -> Path:
    from transformers import (Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor,
                              Llama4TextConfig, Llama4VisionConfig)

    torch.manual_seed(seed)
    tok = tokenizer()
    chunk, patch = 16, 4
    vision = Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=chunk, patch_size=patch, vision_output_dim=64, projector_input_dim=64,
                                projector_output_dim=64, pixel_shuffle_ratio=0.5)
    text = Llama4TextConfig(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                            intermediate_size_mlp=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=hidden // 4, num_local_experts=2, num_experts_per_tok=1,
                            interleave_moe_layer_step=2, attention_chunk_size=attention_chunk_size,
                            max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Llama4Config(vision_config=vision, text_config=text,
                          boi_token_index=tok.convert_tokens_to_ids("<|image_start|>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<|image_end|>"),
                          image_token_index=tok.convert_tokens_to_ids("<|patch|>"))
    model = Llama4ForConditionalGeneration(config).eval()
    scale_linear([model.language_model])             # a Llama4ForCausalLM: decoder and lm_head
    with torch.no_grad():                             # the experts are 3-D parameters [experts, ...]
        for name, p in model.language_model.named_parameters():
            if "experts" in name and p.dim() == 3:
                p.normal_(0, 0.3)
    image_proc = Llama4ImageProcessor(size={"height": chunk, "width": chunk}, max_patches=4)
    processor = Llama4Processor(image_processor=image_proc, tokenizer=tok, patch_size=patch, pixel_shuffle_ratio=0.5,
                                chat_template=TEMPLATE)
    silence(model, [config.image_token_id])
    return finish(model, tok, folder, processor)
