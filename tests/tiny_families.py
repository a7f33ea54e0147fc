"""Tiny models of more VLM families (Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, Idefics3, SmolVLM) built from configs with
random weights, a WordLevel tokenizer and the family's own processor, saved to a folder so tests load them back
through ``mmspec.load`` as a user loads a hub checkpoint. Every target has a padded vocabulary (embedding rows
beyond the tokenizer, like Qwen2-VL-7B's 152064 vs 151936). No downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from tests.tiny import WORDS

# ----------------------------------------------------------------------------------------------------- helpers


def _word_tokenizer(specials: list[str], added: list[str], unk="<unk>", bos=None, eos=None, pad=None,
                    template: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(list(dict.fromkeys(specials + list(WORDS))))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad)
    if added:
        fast.add_special_tokens({"additional_special_tokens": added})
    if template:
        fast.chat_template = template
    return fast


def _scale_language_model(modules) -> None:
    """Larger weights than the default init: varied, image-dependent greedy output far from ties."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.3)


def _finish(model, tok, folder: Path, processor) -> Path:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def copy_vision(src, dst, prefixes: tuple[str, ...]) -> None:
    """Copy the parameters whose names start with one of ``prefixes`` (vision tower, projector) from src to dst.
    ``src`` is a model or a saved folder."""
    if isinstance(src, (str, Path)):
        from transformers import AutoModelForImageTextToText

        src = AutoModelForImageTextToText.from_pretrained(src)
    sd = src.state_dict()
    with torch.no_grad():
        for name, p in dst.state_dict().items():
            if name.startswith(prefixes):
                p.copy_(sd[name])


# ---------------------------------------------------------------------------------------------- Qwen2(.5)-VL

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}"
                 "{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    words = QWEN_SPECIALS + ["user", "assistant", "system"]
    return _word_tokenizer(words, QWEN_ADDED, unk="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>",
                           template=QWEN_TEMPLATE)


def build_tiny_qwen_vl(folder: Path, version: str = "2", vocab_pad: int = 7, seed: int = 0, hidden: int = 48,
                       layers: int = 2, vision_from=None) -> Path:
    """A Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") with M-RoPE, patch 4, merge 2 (8x8 pixels per token)."""
    from transformers import (Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_ADDED}
    heads = 4
    half = hidden // heads // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": section},
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as cls

        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as cls

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    model = cls(config).eval()
    _scale_language_model([model.model.language_model, model.lm_head])
    if vision_from is not None:
        copy_vision(vision_from, model, ("model.visual.",))
    size = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    image_proc = Qwen2VLImageProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    video_proc = Qwen2VLVideoProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                 chat_template=QWEN_TEMPLATE)
    return _finish(model, tok, folder, processor)


def build_tiny_qwen_text_drafter(folder: Path, seed: int = 1, vocab_rows: int | None = None) -> Path:
    """A Qwen2 causal LM with the target's tokenizer (like Qwen2.5-0.5B-Instruct for Qwen2.5-VL-7B)."""
    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    cfg = Qwen2Config(vocab_size=vocab_rows or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ test helpers


def hf_greedy(pipe, image, prompt: str, max_new_tokens: int) -> list[int]:
    """The target's own ``generate(do_sample=False)`` on the processor's output for the chat-formatted prompt."""
    text = pipe.adapter.format_prompt(prompt)
    inputs = pipe.processor(images=image, text=text, return_tensors="pt")
    out = pipe.target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_logits(pipe, image, prompt: str, new_ids: list[int]):
    """The target's logits (no cache, one forward over prompt + ``new_ids``) for the last len(new_ids)+1 positions."""
    text = pipe.adapter.format_prompt(prompt)
    inputs = dict(pipe.processor(images=image, text=text, return_tensors="pt"))
    n = len(new_ids)
    extra = torch.tensor([new_ids], dtype=torch.long)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(extra) if key == "attention_mask" else torch.zeros_like(extra)
            inputs[key] = torch.cat([inputs[key], fill.to(inputs[key].dtype)], dim=1)
    with torch.no_grad():
        logits = pipe.target(**inputs).logits[0, -(n + 1):].float()
    return logits
