"""A tiny Gemma 3 (``gemma3``): SigLIP tower (32 px, patch 4: 8x8 patches) average-pooled to 16 image tokens per
image, a decoder of sliding-window and global layers alternating, with a window (8) smaller than any prompt (~30
tokens) so the window matters, and the image's tokens attending to each other both ways (``token_type_ids``).

Built as the hub checkpoints are laid out: the prompt names the image by ``<start_of_image>`` (the processor's
``image_token``), which the processor expands to ``\\n\\n<start_of_image>`` + 16 x ``<image_soft_token>`` +
``<end_of_image>\\n\\n``; eos is ``<eos>`` and ``<end_of_turn>``; the embeddings are scaled by sqrt(hidden).
The projector's weight is zero at init (it would ignore the image) and the embeddings are untied (a tiny tied
model repeats its prompt): both are changed here."""

from __future__ import annotations

from pathlib import Path

import torch

from mmspec.tiny.common import finish, scale_linear, silence, word_tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]        # ids 0..3 as in Gemma's vocabulary
ADDED = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn> {{ 'model' if m['role'] == 'assistant' else "
            "m['role'] }} {% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
            "{% endif %}<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model {% endif %}")


def tokenizer():
    return word_tokenizer(SPECIALS + ["user", "model", "system"], ADDED, unk="<unk>", bos="<bos>", eos="<eos>",
                          pad="<pad>", template=TEMPLATE,
                          extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": "<image_soft_token>"})


def build(folder: Path, seed: int = 1, hidden: int = 48, layers: int = 4, global_every: int = 2,
          sliding_window: int = 8, image_tokens: int = 16, vocab_pad: int = 5, projector_std: float = 0.3) -> Path:
    """Layer i is global when (i + 1) % ``global_every`` == 0 (Gemma 3 itself: 6), sliding otherwise."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              SiglipVisionConfig)

    torch.manual_seed(seed)
    tok = tokenizer()
    vision = SiglipVisionConfig(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, vision_use_head=False)
    heads, head_dim = 4, hidden // 4
    layer_types = ["full_attention" if (i + 1) % global_every == 0 else "sliding_attention" for i in range(layers)]
    text = dict(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
                query_pre_attn_scalar=head_dim, sliding_window=sliding_window, layer_types=layer_types,
                max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=image_tokens,
                          boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                          image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
                          tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(config).eval()
    scale_linear([model.model.language_model, model.lm_head])
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, projector_std)
    image_proc = Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_proc, tokenizer=tok, chat_template=TEMPLATE,
                                image_seq_length=image_tokens)
    silence(model, [config.image_token_id])
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    return finish(model, tok, folder, processor, eos_ids=eos)
