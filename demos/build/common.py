"""What every stage of the bundled models' build shares: the tokenizer, processor and target config (built from
code, nothing downloaded), chat-formatted prompt ids, the pre-rendered training pool, batches, and the held-out
checks (exact greedy by teacher forcing, scores per prompt kind)."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from vision import scenes
from vision.scenes import KINDS, TRAIN_SEED_START, DEFAULT_RENDER_SIZE, is_correct

ROOT = scenes.ROOT
MODELS = ROOT / "assets" / "models"  # the bundled models, one folder each
IMAGE_SIZE = 72
PATCH = 24  # one patch per cell of the 3x3 grid: each image token sees one object
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 9 (CLS dropped by "default")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in parts %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in parts %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in parts %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# --------------------------------------------------------------------------- tokenizer / processor

def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in scenes.vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = build_tokenizer()
    ip = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
    )


def chat_prompt(processor, text: str) -> str:
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------- target config

def target_config(tok):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=256, num_channels=3,
    )
    # Deep and narrow: at batch 1 on a CPU a layer costs ~0.6 ms whatever its width, so 16 layers make
    # the target's per-token forward >8x the 1-layer drafter's while training FLOPs stay small.
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=192, intermediate_size=576, num_hidden_layers=16,
        num_attention_heads=4, num_key_value_heads=4, head_dim=48, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=False,
    )
    return cfg


def set_generation_config(model, tok, max_new_tokens=48):
    gc = model.generation_config
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.bos_token_id
    gc.do_sample = False
    gc.max_new_tokens = max_new_tokens
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)


# --------------------------------------------------------------------------- data

class PromptCache:
    """Token ids of chat-formatted prompts (image placeholders expanded) and answers."""

    def __init__(self, processor):
        from PIL import Image

        self.processor = processor
        self.tok = processor.tokenizer
        self._dummy = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        self.prompts: dict[str, list[int]] = {}
        self.answers: dict[str, list[int]] = {}

    def prompt_ids(self, text: str) -> list[int]:
        if text not in self.prompts:
            enc = self.processor(images=self._dummy, text=chat_prompt(self.processor, text), return_tensors="pt")
            self.prompts[text] = enc["input_ids"][0].tolist()
        return self.prompts[text]

    def answer_ids(self, text: str) -> list[int]:
        if text not in self.answers:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            assert self.tok.unk_token_id not in ids, text
            self.answers[text] = ids + [self.tok.eos_token_id]
        return self.answers[text]


def build_pool(processor, n_scenes: int, path: Path, seed_start: int = TRAIN_SEED_START):
    """Pre-render training scenes once into normalised pixel tensors (cached on disk)."""
    if path.exists():
        d = torch.load(path)
        if d["pixels"].shape[0] == n_scenes:
            return d
    pixels = torch.empty(n_scenes, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float16)
    seeds = list(range(seed_start, seed_start + n_scenes))
    chunk = 256
    for i in tqdm(range(0, n_scenes, chunk), desc="render pool"):
        imgs = []
        for s in seeds[i:i + chunk]:
            size = 288 if s % 5 == 0 else DEFAULT_RENDER_SIZE  # a few at the asset size
            imgs.append(scenes.render(scenes.scene_for_seed(s), size))
        pv = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        pixels[i:i + len(imgs)] = pv.to(torch.float16)
    d = {"pixels": pixels, "seeds": seeds}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(d, path)
    return d


KIND_WEIGHTS = {"caption": 0.4, "color": 0.15, "count": 0.15, "position": 0.15, "yesno": 0.15}
# Stage 3 (tune-questions): the questions that must find the object they name, mostly.
QUESTION_WEIGHTS = {"caption": 0.15, "color": 0.1, "count": 0.05, "position": 0.3, "yesno": 0.4}


def sample_batch(pool, cache: PromptCache, rng: random.Random, batch: int, per_image: int = 2,
                 kind_weights: dict[str, float] = KIND_WEIGHTS):
    """(input_ids, attention_mask, labels, pool indices) of a random batch; right padding."""
    tok = cache.tok
    n = len(pool["seeds"])
    seqs, labs, pix = [], [], []
    kinds, weights = list(kind_weights), list(kind_weights.values())
    while len(seqs) < batch:
        j = rng.randrange(n)
        scene = scenes.scene_for_seed(pool["seeds"][j])
        for kind in rng.choices(kinds, weights, k=per_image):
            p, a = scenes.prompt_for(scene, kind, rng)
            pids, aids = cache.prompt_ids(p), cache.answer_ids(a)
            seqs.append(pids + aids)
            labs.append([-100] * len(pids) + aids)
            pix.append(j)
    ids, mask, labels = pad_batch(seqs[:batch], labs[:batch], tok.pad_token_id)
    return ids, mask, labels, torch.tensor(pix[:batch])


def pad_batch(seqs, labs, pad_id):
    """Right-padded (input_ids, attention_mask, labels), the width rounded up to a multiple of 8."""
    L = -(-max(len(s) for s in seqs) // 8) * 8
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    return ids, mask, labels


# --------------------------------------------------------------------------- held-out checks

def heldout_examples(n_scenes: int, start: int = 0):
    exs = []
    for s in range(start, start + n_scenes):
        assert s in scenes.HELDOUT_SEEDS
        exs += scenes.examples_for_scene(s)
    return exs


def score(examples, answers):
    per = defaultdict(lambda: [0, 0])
    for e, a in zip(examples, answers):
        per[e.kind][0] += is_correct(a, e)
        per[e.kind][1] += 1
    return per


def format_scores(per) -> str:
    lines = []
    tot = [0, 0]
    for k in KINDS:
        if k in per:
            c, n = per[k]
            tot[0] += c
            tot[1] += n
            lines.append(f"  {k:<9} {c:4d}/{n:<4d} = {100 * c / n:6.2f}%")
    q = [sum(per[k][0] for k in per if k != "caption"), sum(per[k][1] for k in per if k != "caption")]
    if q[1]:
        lines.append(f"  {'questions':<9} {q[0]:4d}/{q[1]:<4d} = {100 * q[0] / q[1]:6.2f}%")
    lines.append(f"  {'all':<9} {tot[0]:4d}/{tot[1]:<4d} = {100 * tot[0] / max(1, tot[1]):6.2f}%")
    return "\n".join(lines)


@torch.no_grad()
def forced_greedy(model, processor, examples, batch_size=32, cache=None):
    """Exact greedy check by teacher forcing on the true answers (one forward per batch).

    Greedy decoding reproduces the true answer (+EOS) iff the argmax at every answer
    position equals the true token.  Returns per example (prompt_ids, answer_ids+EOS,
    matched: bool, first_argmax: the target's greedy first answer token).
    Right padding keeps every real position exactly as in an unpadded run.
    """
    cache = cache or PromptCache(processor)
    tok = processor.tokenizer
    res = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        pids = [cache.prompt_ids(e.prompt) for e in chunk]
        aids = [cache.answer_ids(e.answer) for e in chunk]
        ids, mask, _ = pad_batch([p + a for p, a in zip(pids, aids)], [[] for _ in chunk], tok.pad_token_id)
        pix = processor.image_processor(images=[e.image for e in chunk], return_tensors="pt")["pixel_values"]
        pred = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits.argmax(-1)
        for b, (p, a) in enumerate(zip(pids, aids)):
            got = pred[b, len(p) - 1:len(p) - 1 + len(a)].tolist()
            res.append((p, a, got == a, got[0]))
    return res
