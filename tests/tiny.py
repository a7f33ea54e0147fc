"""Tiny models built from configs (random weights) with a real tokenizer and processor saved to a folder,
so tests load them back through ``mmspec.load`` exactly as a user loads a hub checkpoint. No downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

WORDS = ("USER ASSISTANT : the a an is are there what where how many color red green blue yellow circle square "
         "triangle star left right top bottom center of in image describe one two three four yes no small large "
         "? . ,").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER : {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}")


def make_tokenizer(words=WORDS, extra_image_token: bool = True) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    if extra_image_token:
        fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llava(folder: Path, vocab_pad: int = 5, seed: int = 0, image_size: int = 32, patch: int = 8,
                     max_positions: int = 256, layers: int = 2, vision_from=None) -> Path:
    """A LLaVA with a padded vocabulary (embedding rows > tokenizer size, like llava-1.5's 32064).
    ``vision_from``: a LLaVA (model or folder) whose vision tower and projector this one copies."""
    torch.manual_seed(seed)
    tok = make_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok) + vocab_pad, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    # Larger weights than the default init: varied, image-dependent greedy output with argmaxes far from ties.
    with torch.no_grad():
        for p in list(model.model.language_model.parameters()) + [model.lm_head.weight]:
            if p.dim() == 2:
                p.normal_(0, 0.3)
    if vision_from is not None:
        from tests.tiny_families import copy_vision

        copy_vision(vision_from, model, ("model.vision_tower.", "model.multi_modal_projector."))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_text_drafter(folder: Path, seed: int = 1, words=WORDS, vocab_rows: int | None = None) -> Path:
    """A text drafter with the target's tokenizer minus the image token (like Vicuna for llava-1.5)."""
    torch.manual_seed(seed)
    tok = make_tokenizer(words, extra_image_token=False)
    cfg = LlamaConfig(vocab_size=vocab_rows or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sample_image(seed: int = 0, size: int = 48) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")
