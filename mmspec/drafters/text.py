"""``drafter_kind="text"``: a small causal LM sharing the target's tokenizer, drafting from the prompt text alone.

It never sees image tokens: its prompt is the target's prompt with every image placeholder removed. Ids it
cannot produce (the target's padding rows, image placeholders) get draft probability 0.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from mmspec.config import DecodeConfig
from mmspec.drafters.base import Draft, Drafter, DraftSession, sample_block
from mmspec.drafters.vocab import check_same_tokenizer, undraftable_ids
from mmspec.kv import CACHE_KW, rollback
from mmspec.targets.base import Request, TargetAdapter


LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def lean_decode_step(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """One-token forward through the model's own layers, without the mask building and output plumbing of
    the full ``forward`` (a single new query attends to the whole cache, so it needs no mask). Drafting is
    latency-bound and its numerics never change what is emitted; this roughly halves a tiny drafter's step.

    ids: [1] -> logits [vocab]
    """
    inner = model.model
    hidden = inner.embed_tokens(ids[None])
    position = torch.tensor([[cache.get_seq_length()]], device=hidden.device)
    rotary = inner.rotary_emb(hidden, position)
    for layer in inner.layers:
        hidden = layer(hidden, attention_mask=None, position_ids=position, position_embeddings=rotary,
                       use_cache=True, **{CACHE_KW: cache})
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return model.lm_head(inner.norm(hidden))[0, -1]


def lean_step_works(model) -> bool:
    """Use the lean step only where it reproduces the model's own forward (checked once, at load)."""
    if getattr(model.config, "model_type", None) not in LEAN_MODEL_TYPES or getattr(model.config, "sliding_window", None):
        return False
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    try:
        with torch.inference_mode():
            device = model.get_input_embeddings().weight.device
            ids = torch.arange(1, 6, device=device) % model.config.vocab_size
            full = DynamicCache(config=model.config)
            ref = model(input_ids=ids[None], use_cache=True, **{CACHE_KW: full}).logits[0, -1]
            lean = DynamicCache(config=model.config)
            model(input_ids=ids[None, :-1], use_cache=True, **{CACHE_KW: lean})
            got = lean_decode_step(model, ids[-1:], lean)
        return bool(torch.allclose(ref.float(), got.float(), atol=1e-3, rtol=1e-3))
    except Exception:  # another layer signature: the regular forward is always right
        return False


class CausalLMDraftSession(DraftSession):
    """Autoregressive drafting with a KV cache over ``seq`` (the drafter's view of prompt + output)."""

    def __init__(self, drafter: "TextDrafter", seq: list[int], config: DecodeConfig,
                 generator: torch.Generator | None, prefix_embeds: torch.Tensor | None = None):
        self.model = drafter.model
        self.lean = drafter.lean_step
        self.embed = self.model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.bad = drafter.bad_ids.to(self.device)
        self.target_vocab = drafter.target.vocab_size
        self.max_len = drafter.context_length - (0 if prefix_embeds is None else prefix_embeds.shape[1])
        self.config = config
        self.generator = generator
        # Ids the drafter has no row for (the target's padding rows, its added tokens) are read as unknown.
        self.rows = self.model.get_input_embeddings().weight.shape[0]
        self.unk = drafter.unk_id
        self.seq = self._readable(seq)
        self.cache = DynamicCache(config=self.model.config)
        self.cached = 0          # positions of ``seq`` whose keys/values are in the cache
        self.offset = 0          # positions before ``seq`` (visual prefix tokens)
        self.forwards = 0
        self._last_k = 0
        if prefix_embeds is not None:
            # [1, m, hidden]: visual tokens placed before the prompt, fed once.
            self.model(inputs_embeds=prefix_embeds.to(self.embed.weight.dtype), use_cache=True,
                       logits_to_keep=1, **{CACHE_KW: self.cache})
            self.offset = prefix_embeds.shape[1]
            self.forwards += 1

    def _readable(self, ids: list[int]) -> list[int]:
        return [t if t < self.rows else self.unk for t in ids]

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [n] -> logits of the last position [drafter_vocab]
        self.forwards += 1
        if self.lean and ids.shape[0] == 1:
            logits = lean_decode_step(self.model, ids, self.cache)
        else:
            logits = self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1,
                                **{CACHE_KW: self.cache}).logits[0, -1]
        return logits.float().masked_fill(self.bad, float("-inf"))

    def propose(self, k: int) -> Draft:
        k = min(k, self.max_len - len(self.seq))
        self._last_k = max(k, 0)
        if k <= 0:
            return Draft(torch.empty(0, dtype=torch.long, device=self.device))
        logits = self._step(torch.tensor(self.seq[self.cached:], device=self.device))
        draft = sample_block(logits, self._step, k, self.config, self.generator, self.target_vocab)
        self.cached = len(self.seq) + k - 1
        return draft

    def update(self, n_accepted: int, emitted: list[int]) -> None:
        before = len(self.seq)
        self.seq.extend(self._readable(emitted))
        if self._last_k:
            # The cache holds seq + drafts[:k-1]; the accepted drafts stay valid. When all k were accepted the
            # drafter has not seen the last draft nor the bonus token: the next propose feeds them
            # (fill last tokens into draft model).
            self.cached = min(self.cached, before + min(n_accepted, self._last_k - 1))
            rollback(self.cache, self.offset + self.cached)


class TextDrafter(Drafter):
    kind = "text"
    default_k = 4
    needs_weights = True

    @classmethod
    def from_pretrained(cls, target: TargetAdapter, path, dtype, trust_remote_code: bool = False) -> "TextDrafter":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mmspec.pipeline import from_pretrained

        kw = dict(trust_remote_code=trust_remote_code)
        model = from_pretrained(AutoModelForCausalLM, "drafter", path, dtype=dtype, use_safetensors=True, **kw)
        tokenizer = from_pretrained(AutoTokenizer, "drafter tokenizer", path, **kw)
        return cls(target, model.to(target.device).eval(), tokenizer)

    def __init__(self, target: TargetAdapter, model, tokenizer):
        super().__init__(target)
        check_same_tokenizer(target.tokenizer, tokenizer, target.image_token_ids)
        self.model = model
        self.tokenizer = tokenizer
        rows = model.get_output_embeddings().weight.shape[0]
        self.bad_ids = undraftable_ids(rows, target.vocab_size, tokenizer, target.image_token_ids)
        self.lean_step = lean_step_works(model)
        unk = tokenizer.unk_token_id
        self.unk_id = int(unk if unk is not None else (tokenizer.eos_token_id or 0))
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)

    def session(self, request: Request, config: DecodeConfig, generator) -> DraftSession:
        return CausalLMDraftSession(self, request.text_only_ids, config, generator)
