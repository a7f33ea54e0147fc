"""Helpers shared by the tiny family builders: a small vocabulary, tokenizers (word-level, or a byte-level BPE
trained in memory), weight scaling, saving."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# the tiny models' vocabulary (prompt-like words; the same list as tests/tiny.py's)
WORDS = ("USER ASSISTANT : the a an is are there what where how many color red green blue yellow circle square "
         "triangle star left right top bottom center of in image describe one two three four yes no small large "
         "? . ,").split()

# a few sentences a byte-level BPE is trained on (the WORDS vocabulary, in prompt-like order)
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 3)] + [
    "what color is the circle ?", "describe the image .", "there are two red squares in the top left .",
    "how many blue triangles are there ?", "a large yellow star in the center of the image .", "user", "assistant",
    "system", "model",
]


def word_tokenizer(specials: list[str], added: list[str], *, unk: str, bos=None, eos=None, pad=None,
                   template: str | None = None, extra: dict | None = None) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over ``specials`` + the test vocabulary (whitespace-split), with ``added`` special
    tokens. ``extra``: named special tokens (``{"image_token": "<image>"}``) a processor reads off the tokenizer."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    kw = dict(extra_special_tokens=extra) if extra else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos,
                                   pad_token=pad, **kw)
    missing = [t for t in added if t not in fast.get_vocab()]
    if missing:
        fast.add_special_tokens({"additional_special_tokens": missing})
    if template:
        fast.chat_template = template
    return fast


def bpe_tokenizer(specials: list[str], pre_tokenizer, *, vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained in memory on ``CORPUS`` (a second), ``specials`` first in the vocabulary."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def scale_linear(modules, std: float = 0.3) -> None:
    """Larger weights than the default init (every 2-D parameter ~ N(0, std)): varied, image-dependent greedy
    output far from ties. Norm weights and biases are left as they are."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0, std)


def silence(model, ids) -> None:
    """Zero the output-embedding rows of ``ids`` (image/video placeholders): their logit is then 0 while some of
    the other ~60 rows' random logits are almost surely above it, so greedy output never contains a placeholder
    (as with real checkpoints; a placeholder in the output would be read back as an image slot). The input
    embeddings are untied and keep their rows."""
    head = model.get_output_embeddings().weight
    assert head.data_ptr() != model.get_input_embeddings().weight.data_ptr(), "tied embeddings"
    with torch.no_grad():
        head[list(ids)] = 0


def finish(model, tokenizer, folder: Path, processor, eos_ids=None) -> Path:
    """Greedy generation config (eos, pad), then model and processor (with its tokenizer) saved to ``folder``."""
    folder = Path(folder)
    gen = model.generation_config
    gen.eos_token_id = eos_ids if eos_ids is not None else tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Qwen-VL's chat tokens (the Qwen2-VL fixtures in tests/tiny_families.py build the same tokenizer)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
                 "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> {% else %}"
                 "{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(QWEN_SPECIALS + ["user", "assistant", "system"], QWEN_ADDED, unk="<|endoftext|>",
                          eos="<|im_end|>", pad="<|endoftext|>", template=QWEN_TEMPLATE)
