"""The smallest engine-style greedy loop per family, checked against transformers' own ``generate()``.

What ``NOTES.md`` says an engine must do, done once per family in plain code: image features from the model's
``get_image_features``, spliced into the prompt's embeddings at the placeholder positions; positions built by the
caller (1-D, or 3-D from ``get_rope_index`` then ``p + rope_delta``); every attention mask built by the caller as
an additive 4-D tensor (one per layer type where the family has several); ``model.get_decoder()`` called with
``inputs_embeds`` / ``attention_mask`` / ``position_ids`` / a cache; ``get_output_embeddings()`` for the logits.

Two runs per image, each compared with ``generate(do_sample=False)``:
- ``steps``: the prompt in one forward, then one token per forward;
- ``verify``: the prompt, then generate()'s whole continuation in ONE forward (several new queries over a cache,
  as a speculative verify step): its argmaxes must reproduce the continuation.

The cache holds every position (``DynamicCache()`` without a config: full layers everywhere), and sliding windows
are applied in the mask, not by the cache; Qwen3.5 needs ``DynamicCache(config=...)`` for its linear-attention
layers. Not a pytest test: ``check_generate.py`` runs it.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from mmspec.kv import CACHE_KW

THREE_D = ("qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5")


# ------------------------------------------------------------------------------------------------ image features


def image_features(model, inputs) -> tuple[torch.Tensor, list | None]:
    """[n_placeholders, hidden] of all images in order, and Qwen3-VL's DeepStack features (one [n, hidden] per
    fed decoder layer) or None. Families differ only in which processor outputs they take."""
    inner, kind = model.model, model.config.model_type
    pv = inputs["pixel_values"]
    with torch.inference_mode():
        if kind in THREE_D:
            out = inner.get_image_features(pv, inputs["image_grid_thw"])
        elif kind == "mistral3":
            out = inner.get_image_features(pixel_values=pv, image_sizes=inputs["image_sizes"])
        else:   # gemma3, internvl (defaults for the feature layer / strategy come from the config)
            out = inner.get_image_features(pixel_values=pv)
    pooled = out.pooler_output
    pooled = torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled]) if isinstance(pooled, (list, tuple)) \
        else pooled.reshape(-1, pooled.shape[-1])
    deep = getattr(out, "deepstack_features", None)
    if deep is not None:
        deep = [torch.cat(list(per_layer)) for per_layer in deep]
    return pooled, deep


def prompt_embeds(model, ids: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, L, hidden] with the features at the image placeholders, and the placeholder mask [1, L]."""
    embed = model.get_input_embeddings()
    slots = ids == model.config.image_token_id
    assert int(slots.sum()) == feats.shape[0], (int(slots.sum()), feats.shape)
    with torch.inference_mode():
        emb = embed(ids)                       # Gemma 3: already scaled by sqrt(hidden) inside the embedding
    return emb.masked_scatter(slots[..., None], feats.to(emb.dtype)), slots


# ------------------------------------------------------------------------------------------------------ positions


class Positions:
    """Logical position p (0.. in the row) -> what the decoder takes: [1, T] (1-D families) or [4, 1, T] (row 0
    the text position, rows 1-3 M-RoPE: the prompt's from ``get_rope_index``, later ones p + rope_delta)."""

    def __init__(self, model, inputs):
        self.mrope = None
        if model.config.model_type in THREE_D:
            with torch.inference_mode():
                pos, delta = model.model.get_rope_index(inputs["input_ids"],
                                                        mm_token_type_ids=inputs["mm_token_type_ids"],
                                                        image_grid_thw=inputs["image_grid_thw"])
            self.mrope, self.delta = pos[:, 0], int(delta.view(-1)[0])       # [3, L]

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        if self.mrope is None:
            return p[None]
        m = (p + self.delta).expand(3, -1).clone()
        inside = p < self.mrope.shape[1]
        m[:, inside] = self.mrope[:, p[inside]]
        return torch.cat([p[None], m])[:, None]


# ----------------------------------------------------------------------------------------------------------- masks


def masks(model, q: torch.Tensor, kv: torch.Tensor, groups: torch.Tensor | None, dtype) -> dict | torch.Tensor:
    """Additive masks [1, 1, T, S] for queries at positions ``q`` [T] over keys at ``kv`` [S] (cache + new).
    Causal everywhere; a sliding layer also needs kv > q - window; Gemma 3's prefill lets the tokens of one image
    (``groups`` [S]: image index per key, -1 for text) see each other both ways. Families with several layer types
    get a dict keyed by layer type."""
    text = model.config.get_text_config()
    allowed = kv[None, :] <= q[:, None]
    if groups is not None:
        gq = groups[-q.shape[0]:]
        allowed = allowed | ((gq[:, None] == groups[None, :]) & (gq[:, None] >= 0))

    def additive(ok):
        m = torch.zeros(ok.shape, dtype=dtype)
        return m.masked_fill_(~ok, torch.finfo(dtype).min)[None, None]

    types = set(getattr(text, "layer_types", None) or ())
    if "sliding_attention" in types:
        window = kv[None, :] > q[:, None] - text.sliding_window
        return {"full_attention": additive(allowed), "sliding_attention": additive(allowed & window)}
    return additive(allowed)


# ------------------------------------------------------------------------------------------------------------ loop


class Row:
    """One request driven through the decoder: ``feed(embeds)`` appends positions and returns their logits."""

    def __init__(self, model, inputs, cache=None, one_mask=False, bidirectional=True, deepstack=True, mrope=True):
        """The keywords switch one thing off, to show what goes wrong without it (``pitfalls``)."""
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        text = model.config.get_text_config()
        # full-attention layers keep every position; a linear-attention layer needs its own cache layer
        if cache is None:
            cache = DynamicCache(config=text) if "linear_attention" in (getattr(text, "layer_types", None) or ()) \
                else DynamicCache()
        self.cache = cache
        self.one_mask = one_mask
        self.positions = Positions(model, inputs)
        if not mrope:
            self.positions.mrope = None
        self.length = 0
        ids = inputs["input_ids"]
        feats, self.deep = image_features(model, inputs)
        if not deepstack:
            self.deep = None
        self.prompt, self.slots = prompt_embeds(model, ids, feats)
        self.groups = None
        if "token_type_ids" in inputs and bidirectional:    # Gemma 3: one group per contiguous run of image tokens
            img = inputs["token_type_ids"][0] == 1
            start = img & ~torch.nn.functional.pad(img, (1, 0))[:-1]
            self.groups = torch.where(img, torch.cumsum(start.long(), 0) - 1, -1)

    def feed(self, embeds: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        T = embeds.shape[1]
        p = torch.arange(self.length, self.length + T)
        kv = torch.arange(0, self.length + T)
        # the bidirectional image block is a prefill-only thing in generate() (token_type_ids dropped afterwards)
        groups = self.groups if prefill else None
        kw = {}
        if self.deep is not None and prefill:      # Qwen3-VL DeepStack: added after decoder layers 0..n-1
            kw = dict(visual_pos_masks=self.slots, deepstack_visual_embeds=self.deep)
        mask = masks(self.model, p, kv, groups, embeds.dtype)
        if self.one_mask and isinstance(mask, dict):
            mask = mask["full_attention"]
        with torch.inference_mode():
            out = self.decoder(inputs_embeds=embeds, attention_mask=mask,
                               position_ids=self.positions(p), use_cache=True, **{CACHE_KW: self.cache}, **kw)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            logits = self.head(hidden)[0].float()
        self.length += T
        return logits

    def embed(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.get_input_embeddings()(torch.tensor([ids]))


def greedy_steps(model, inputs, n: int, **row) -> list[int]:
    row = Row(model, inputs, **row)
    logits = row.feed(row.prompt, prefill=True)
    out = [int(logits[-1].argmax())]
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    while len(out) < n and out[-1] not in eos:
        out.append(int(row.feed(row.embed(out[-1:]))[-1].argmax()))
    return out


def verify_all(model, inputs, continuation: list[int], **row) -> list[int]:
    """The prompt, then the whole continuation in one forward: the argmax after each fed token."""
    row = Row(model, inputs, **row)
    first = int(row.feed(row.prompt, prefill=True)[-1].argmax())
    if len(continuation) < 2:
        return [first]
    rest = row.feed(row.embed(continuation[:-1])).argmax(-1).tolist()
    return [first] + rest


def check(model, inputs, expected: list[int]) -> dict:
    """Both loops against generate()'s tokens ``expected``."""
    steps = greedy_steps(model, inputs, len(expected))
    verify = verify_all(model, inputs, expected)
    return {"steps": "== generate" if steps == expected else f"DIFFERS {steps}",
            "verify": "== generate" if verify == expected else f"DIFFERS {verify}"}


def pitfalls(model, inputs, expected: list[int]) -> dict:
    """What goes wrong when the engine leaves out one family-specific thing (greedy steps against generate())."""
    kind = model.config.model_type
    text = model.config.get_text_config()
    cases = {}
    if kind in THREE_D:
        cases["1-D positions instead of M-RoPE"] = dict(mrope=False)
    if kind in ("qwen3_vl", "qwen3_vl_moe"):
        cases["no DeepStack kwargs"] = dict(deepstack=False)
    if kind == "gemma3":
        cases["no bidirectional image block at prefill"] = dict(bidirectional=False)
        cases["one 4-D mask for every layer (no window)"] = dict(one_mask=True)
        cases["DynamicCache(config=text_config) (sliding layers keep window-1 keys)"] = dict(
            cache=DynamicCache(config=text))
    if kind == "qwen3_5":
        cases["DynamicCache() without config"] = dict(cache=DynamicCache())
    out = {}
    for name, kw in cases.items():
        try:
            got = greedy_steps(model, inputs, len(expected), **kw)
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
            out[name] = "same as generate" if got == expected else f"differs from step {first}"
        except Exception as e:   # noqa: BLE001 - the error is the finding
            out[name] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def linear_rollback(model, inputs, expected: list[int], k: int = 6, accept: int = 2) -> dict:
    """Qwen3.5: one verify step of k tokens (generate()'s own continuation: the pending token then k-1 drafts),
    of which only ``accept`` drafts are kept; roll the cache back, then decode on. The result must equal
    generate(). Three ways of rolling back:
    - ``crop``: ``cache.crop(-removed)``, as assisted generation does for attention-only models;
    - ``record past + crop``: ``activate_past_recording()`` before the verify, then the same crop (the conv state
      rolls back; the recurrent state cannot, and ``cache.is_croppable`` says so);
    - ``snapshot + re-feed``: copy every linear layer's conv and recurrent state before the verify; afterwards put
      them back, crop the attention layers' keys by k and feed the kept tokens again (one more forward)."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    k = min(k, len(expected) - 1)
    accept = min(accept, k - 2)
    keep = accept + 1                         # the pending token and the accepted drafts stay in the cache
    results = {}
    for way in ("crop", "record past + crop", "snapshot + re-feed"):
        row = Row(model, inputs)
        assert int(row.feed(row.prompt, prefill=True)[-1].argmax()) == expected[0]
        base = row.length
        linear = [layer for layer in row.cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]
        if way == "record past + crop":
            row.cache.activate_past_recording()
        saved = [(layer.conv_states[0].clone(), layer.recurrent_states[0].clone()) for layer in linear]
        verify = row.feed(row.embed(expected[:k]))          # [k, vocab]
        try:
            if way == "snapshot + re-feed":
                with torch.inference_mode():
                    for layer, (conv, rec) in zip(linear, saved):
                        layer.conv_states[0] = conv
                        layer.recurrent_states[0].copy_(rec)
                    for layer in row.cache.layers:
                        if layer not in linear:
                            layer.crop(-k)
                row.length = base
                bonus = int(row.feed(row.embed(expected[:keep]))[-1].argmax())
            else:
                row.cache.crop(-(k - keep))
                row.length = base + keep
                bonus = int(verify[keep - 1].argmax())     # the target's token after the last kept one
            out = expected[:keep] + [bonus]
            while len(out) < len(expected):
                out.append(int(row.feed(row.embed(out[-1:]))[-1].argmax()))
            first = next((i for i, (a, b) in enumerate(zip(out, expected)) if a != b), None)
            results[way] = "== generate" if out == expected else f"differs from step {first}"
        except Exception as e:   # noqa: BLE001 - the error is the finding
            results[way] = f"{type(e).__name__}: {str(e)[:150]}"
        results[f"{way}: cache.is_croppable"] = row.cache.is_croppable
    return results
