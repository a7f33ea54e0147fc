"""An independent reference for EAGLE-3 heads (issue 27), in plain torch.

Written from the published code, NOT from mmspec's head code (nothing here imports mmspec, and nothing here uses
transformers' modules either): tests compare what mmspec's ``eagle`` drafter drafts with what this file computes
for the same weights and the same target hidden states.

What the math follows, and where it was read (commits are the ones the code index / snapshots held):

* vLLM ``vllm/model_executor/models/llama_eagle3.py`` (index commit 00bd1493), the serving implementation whose
  behaviour mmspec must reproduce ("a loaded head runs exactly as vLLM runs it"):
    - ``LlamaDecoderLayer.forward`` (layer_idx 0): ``embeds = input_layernorm(embeds)``;
      ``hidden, residual = _residual_norm(hidden)``; ``hidden = cat([embeds, hidden], -1)`` (embeddings FIRST);
      ``self_attn`` whose ``qkv_proj`` takes ``2 * hidden_size`` inputs; ``post_attention_layernorm(hidden,
      residual)`` (fused add+norm: ``residual = hidden + residual; hidden = norm(residual)``); ``mlp``.
    - ``_norm_before_residual``: ``hidden = hidden_norm(hidden); residual = hidden`` (residual is the NORMED hidden);
      ``_norm_after_residual``: ``residual = hidden; hidden = hidden_norm(hidden)`` (residual is the RAW hidden).
      Chosen by ``getattr(config, "norm_before_residual", False)``.
    - ``LlamaModel.forward``: ``hidden_states, hidden_prenorm = self.norm(hidden_states, residual)`` -> returns
      ``(normed, prenorm)``; the proposer samples from ``normed`` and feeds ``prenorm`` back (see below).
    - ``LlamaModel.__init__``: ``fc = Linear(3 * target_hidden_size (or hidden_size), hidden_size, bias=False)``.
    - ``Eagle3LlamaForCausalLM.combine_hidden_states``: ``fc(aux)``, applied ONCE, to the target's aux states only.
    - ``Eagle3LlamaForCausalLM.compute_logits``: ``lm_head`` over ``draft_vocab_size`` rows, then scattered into a
      target-vocabulary row filled with ``-inf``: ``targets = arange(draft_vocab_size) + draft_id_to_target_id``.
    - ``Eagle3LlamaForCausalLM.load_weights``: ``t2d`` is skipped; ``d2t`` -> ``draft_id_to_target_id``;
      ``midlayer.`` is renamed ``layers.0.`` (so both published layouts load); everything but ``lm_head`` is
      prefixed ``model.``; ``embed_tokens`` is optional (absent -> the target's embedding is shared).
    - embeddings: vLLM's ``EagleProposer.load_model`` keeps a checkpoint's own ``embed_tokens`` when it differs
      from the target's and shares the target's otherwise; SGLang's ``EAGLEWorker`` always installs the target's
      (``set_embed``). ``reference_draft(embed_source=...)`` offers both.
    - ``Eagle3LlamaForCausalLM.embed_input_ids(input_ids, multimodal_embeddings, is_multimodal)`` ignores the
      multimodal embeddings: image positions embed the image PLACEHOLDER token id; the visual information reaches
      the head only through the target's hidden states.
* vLLM's EAGLE proposer (``vllm/v1/spec_decode/eagle.py`` ``EagleProposer.propose`` /
  ``llm_base_proposer.py`` ``set_inputs_first_pass``; the same lines in every version the index holds):
    - ``target_hidden_states = self.model.combine_hidden_states(target_hidden_states)`` (eagle3 only);
    - ``input_ids[:num_tokens - 1] = target_token_ids[1:]``, then ``input_ids[last_token_indices] =
      next_token_ids`` ("Shift the input ids by one token"); positions and hidden states are NOT shifted
      ("Simply rotate the input ids and leave the positions unchanged").
    - later steps: ``input_ids = draft_token_ids_list[-1]``; ``positions += 1`` (all three rows for M-RoPE);
      ``hidden_states = hidden_states[last_token_indices]`` where ``hidden_states`` is the SECOND output of the
      model, i.e. the pre-norm hidden state; the draft KV of every earlier row stays in the cache.
  => ALIGNMENT (documented in ``reference_draft``): draft row i (i = 0..L-1) = (token t_{i+1} embedded,
     fc(aux hidden state of target position i), rotary position = target position of i). The last row's token
     is the target's own next token t_L (sampled from the target's logits at position L-1). Row L-1's output
     predicts t_{L+1}: the first draft token. Draft step j >= 2 appends one row: (draft token j-1 embedded,
     pre-norm output of the previous last row, previous position + 1).
* Aux layer capture (which target layers feed ``fc``):
    - vLLM ``vllm/model_executor/models/llama.py`` ``LlamaModel.forward``: ``for idx, layer in ...: if idx in
      self.aux_hidden_state_layers: aux_hidden_states.append(hidden_states + residual)`` BEFORE running layer
      ``idx``: id ``i`` = the residual stream ENTERING layer i = HF ``output_hidden_states[i]``. The aux states are
      appended in ascending layer order and concatenated with ``torch.cat(aux, dim=-1)`` (gpu_model_runner), so the
      ``fc`` input order is ascending layer order whatever order the config lists them in. Default (every
      ``get_eagle3_aux_hidden_state_layers``): ``(2, num_layers // 2, num_layers - 3)``.
    - vLLM ``gpu_model_runner._get_eagle3_aux_layers_from_config``: top-level ``eagle_aux_hidden_state_layer_ids``
      first, else ``eagle_config["eagle_aux_hidden_state_layer_ids"]`` taken AS IS (no +1, in the versions read).
    - vLLM ``transformers_utils/configs/speculators/algos.py`` ``update_eagle3``: copies a speculators config's
      top-level ``eagle_aux_hidden_state_layer_ids``, ``draft_vocab_size``, ``target_hidden_size`` and
      ``norm_before_residual`` (DEFAULT TRUE when absent: ``config_dict.get("norm_before_residual", True)``) onto
      ``transformer_layer_config``, and sets ``architectures = ["Eagle3LlamaForCausalLM"]``.
    - speculators ``src/speculators/models/utils.py:52`` ``resolve_target_layer_ids``: default
      ``[2, num_layers // 2, num_layers - 3]``: the same HF ``hidden_states`` indices as vLLM (its training data
      comes from vLLM's capture).
    - SGLang ``python/sglang/srt/models/llama.py`` (and qwen2/qwen3/... ) ``set_eagle3_layers_to_capture``:
      ``layers_to_capture = [val + 1 for val in layer_ids]`` ("we plus 1 here because in sglang, for the ith layer,
      it takes the output of the (i-1)th layer as aux hidden state"), default ``[2, n // 2, n - 3]`` when no ids;
      ``model_runner`` reads ONLY ``eagle_config["eagle_aux_hidden_state_layer_ids"]`` (a top-level list is ignored).
      Capture is ``hidden_states + residual`` before layer i, as in vLLM.
    - SpecForge ``specforge/algorithms/model_providers.py:188-212`` ``resolve_eagle_capture_layers``: ids from
      ``eagle_config.eagle_aux_hidden_state_layer_ids``, default ``[1, n // 2 - 1, n - 4]`` (:204), captured through
      SGLang's ``set_eagle3_layers_to_capture`` (``specforge/offline_capture/sglang_backend/capture.py:86-111``),
      i.e. +1: ids under ``eagle_config`` are written ONE LOWER (they name the layer whose OUTPUT is captured).
  => CONVENTION used here (``aux_hidden_state_indices``): a top-level list is HF ``hidden_states`` indices; a list
     under ``eagle_config`` is one lower (index = id + 1); when both are present they must name the same indices
     (otherwise the config is refused); with neither, ``(2, N // 2, N - 3)``.
     NOTE the ecosystem disagreement: vLLM reads an ``eagle_config`` list without the +1, SGLang reads it with
     the +1 and ignores a top-level list. A head that writes BOTH lists (top-level = HF indices, eagle_config = one
     lower) is read the same way by vLLM, SGLang and this file.
* ``norm_before_residual`` default per layout: SpecForge / vLLM-native configs (no key) -> False (vLLM's
  ``getattr(config, "norm_before_residual", False)``; SpecForge's ``LlamaDecoderLayer.forward``,
  ``specforge/modeling/draft/llama3_eagle.py:1625`` ``residual = hidden_states`` before ``hidden_norm``; SGLang's
  ``llama_eagle3.py`` the same and has no switch); speculators configs -> the key's value, True when absent
  (vLLM ``update_eagle3``). speculators itself always writes the key (pydantic field, default False,
  ``src/speculators/models/eagle3/config.py:43``; first layer ``model_definitions.py:74-81``).
* Vocabulary: SpecForge ``specforge/data/preprocessing.py:760-764``: the draft vocabulary is the most frequent
  target ids, SORTED; ``d2t[i] = used[i] - i`` (int64, size draft_vocab); ``t2d[t] = t in used`` (bool, size
  target vocab). vLLM and SGLang (``hot_token_id = d2t + arange``) read ``d2t`` only.

Not implemented (refused with ``NotImplementedError``, since vLLM's ``llama_eagle3.py`` as read does not implement
them): speculators' ``fc_norm`` / ``norm_before_fc`` / ``norm_output`` (Eagle 3.1), SpecForge's
``norm_output: false`` (logits without the final norm), more than one draft layer, non-SiLU MLPs, Qwen3-style
``q_norm``/``k_norm`` layers, RoPE types other than default / linear / llama3 / M-RoPE (plain and interleaved).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

SPECFORGE_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Qwen2_5vlForCausalLM",
                           "Eagle3Qwen3vlForCausalLM")
SPECULATORS_ARCHITECTURES = ("Eagle3DraftModel", "Eagle3Speculator")

# Tensors of the single decoder layer, relative to its prefix ("midlayer." in SpecForge, "layers.0." in speculators).
LAYER_TENSORS = ("input_layernorm.weight", "hidden_norm.weight", "post_attention_layernorm.weight",
                 "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
OPTIONAL_LAYER_TENSORS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                          "self_attn.o_proj.bias", "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------

def detect_layout(config: Mapping) -> str:
    """``"speculators"`` (``speculators_model_type: "eagle3"``) or ``"specforge"`` (SpecForge / vLLM-native:
    a flat Llama config whose ``architectures`` name an EAGLE-3 class). Anything else is refused."""
    if config.get("speculators_model_type") is not None:
        if config["speculators_model_type"] != "eagle3":
            raise ValueError(f"speculators_model_type {config['speculators_model_type']!r} is not eagle3")
        if not isinstance(config.get("transformer_layer_config"), Mapping):
            raise ValueError("a speculators config needs a transformer_layer_config dict")
        return "speculators"
    archs = list(config.get("architectures") or [])
    if any(a in SPECFORGE_ARCHITECTURES for a in archs):
        return "specforge"
    raise ValueError(f"not an EAGLE-3 head config (architectures={archs!r}, no speculators_model_type)")


def flat_config(config: Mapping) -> dict:
    """One flat Llama-style dict for either layout, as vLLM builds its ``hf_config``:

    speculators: ``transformer_layer_config`` plus the top-level ``draft_vocab_size``, ``target_hidden_size``,
    ``norm_before_residual`` (True when absent) and ``eagle_aux_hidden_state_layer_ids`` (vLLM ``update_eagle3``).
    SpecForge/vLLM: the config itself, ``norm_before_residual`` False when absent.
    Both: ``draft_vocab_size`` defaults to ``vocab_size`` (``Eagle3LlamaForCausalLM.__init__``)."""
    layout = detect_layout(config)
    if layout == "speculators":
        flat = dict(config["transformer_layer_config"])
        flat["draft_vocab_size"] = config.get("draft_vocab_size")
        if config.get("target_hidden_size") is not None:
            flat["target_hidden_size"] = config["target_hidden_size"]
        flat["norm_before_residual"] = bool(config.get("norm_before_residual", True))
        if config.get("eagle_aux_hidden_state_layer_ids"):
            flat["eagle_aux_hidden_state_layer_ids"] = list(config["eagle_aux_hidden_state_layer_ids"])
        for key in ("fc_norm", "norm_before_fc", "norm_output"):
            if config.get(key):
                raise NotImplementedError(f"speculators {key}=true is not part of vLLM's llama_eagle3.py as read")
    else:
        flat = dict(config)
        flat["norm_before_residual"] = bool(config.get("norm_before_residual", False))
        if config.get("fc_norm"):
            raise NotImplementedError("SpecForge fc_norm=true is not part of vLLM's llama_eagle3.py as read")
        if config.get("norm_output", True) is False:
            raise NotImplementedError("SpecForge norm_output=false (logits without the final norm) is not "
                                      "part of vLLM's llama_eagle3.py as read")
    if flat.get("draft_vocab_size") is None:
        flat["draft_vocab_size"] = flat["vocab_size"]
    flat["_layout"] = layout
    return flat


def _text_layers(num_target_layers) -> int:
    if isinstance(num_target_layers, int):
        return num_target_layers
    cfg = num_target_layers
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    if isinstance(cfg, Mapping):
        cfg = cfg.get("text_config", cfg)
        return int(cfg["num_hidden_layers"])
    return int(cfg.num_hidden_layers)


def aux_hidden_state_indices(config: Mapping, num_target_layers) -> tuple[int, ...]:
    """The target's HF ``output_hidden_states`` indices whose states feed ``fc``, ascending (the order vLLM and
    SGLang concatenate them in). ``config``: the head's config.json dict (either layout) or a ``flat_config``.
    ``num_target_layers``: an int or the target's config.

    * top-level ``eagle_aux_hidden_state_layer_ids`` (speculators / vLLM): HF indices as written;
    * ``eagle_config.eagle_aux_hidden_state_layer_ids`` (SpecForge / SGLang): written one lower -> id + 1;
    * both: must agree, else ``ValueError``;
    * neither: ``(2, N // 2, N - 3)``.
    Every index must be in ``[1, N - 1]``: 0 is the embedding output (vLLM's llama capture adds a ``None``
    residual there), N is HF's post-norm output, which no engine captures."""
    n = _text_layers(num_target_layers)
    top = config.get("eagle_aux_hidden_state_layer_ids")
    if top is None and isinstance(config.get("transformer_layer_config"), Mapping):
        top = config["transformer_layer_config"].get("eagle_aux_hidden_state_layer_ids")
    eagle_cfg = config.get("eagle_config") or {}
    lower = eagle_cfg.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle_cfg, Mapping) else None
    from_top = tuple(int(i) for i in top) if top else None
    from_lower = tuple(int(i) + 1 for i in lower) if lower else None
    if from_top is not None and from_lower is not None and sorted(from_top) != sorted(from_lower):
        raise ValueError(f"top-level eagle_aux_hidden_state_layer_ids {list(top)} (HF hidden_states indices) and "
                         f"eagle_config ids {list(lower)} (one lower: {list(from_lower)}) disagree")
    ids = from_top if from_top is not None else from_lower
    if ids is None:
        ids = (2, n // 2, n - 3)
    ids = tuple(sorted(ids))
    if len(set(ids)) != len(ids):
        raise ValueError(f"aux layer indices {ids} repeat a layer (engines capture each layer once)")
    if any(i < 1 or i > n - 1 for i in ids):
        raise ValueError(f"aux layer indices {ids} outside [1, {n - 1}] for a {n}-layer target")
    return ids


def stack_aux_hidden_states(hidden_states: Sequence[torch.Tensor], indices: Sequence[int]) -> torch.Tensor:
    """HF ``output_hidden_states`` (N + 1 tensors, [T, H] or [1, T, H]) -> the [T, len(indices) * H] ``fc``
    input: ``cat([hidden_states[i] for i in sorted(indices)], -1)``."""
    parts = []
    for i in sorted(indices):
        h = hidden_states[i]
        if h.dim() == 3:
            if h.shape[0] != 1:
                raise ValueError("stack_aux_hidden_states takes one row (batch 1)")
            h = h[0]
        parts.append(h)
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# rotary positions
# ----------------------------------------------------------------------------------------------------------------

def _rope_params(cfg: Mapping) -> tuple[float, dict]:
    """(theta, scaling dict) from transformers-4 keys (``rope_theta`` + ``rope_scaling``) or transformers-5
    ``rope_parameters`` (which holds ``rope_theta`` too)."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, Mapping) and "rope_theta" in params:
        theta = params["rope_theta"] if theta is None else theta
        if not scaling:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta if theta is not None else 10000.0), dict(scaling or {})


class _Rope:
    def __init__(self, cfg: Mapping, head_dim: int):
        self.theta, sc = _rope_params(cfg)
        self.head_dim = head_dim
        kind = sc.get("rope_type", sc.get("type", "default")) or "default"
        self.mrope_section = list(sc["mrope_section"]) if sc.get("mrope_section") else None
        self.mrope_interleaved = bool(sc.get("mrope_interleaved", False))
        if self.mrope_section is not None:
            if kind not in ("default", "mrope"):
                raise NotImplementedError(f"M-RoPE with rope type {kind!r}")
            if sum(self.mrope_section) != head_dim // 2:
                raise ValueError(f"mrope_section {self.mrope_section} does not sum to head_dim/2 = {head_dim // 2}")
        # inv_freq computed as transformers / vLLM do (float32)
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if kind in ("default", "mrope"):
            pass
        elif kind == "linear":
            inv = inv / float(sc["factor"])
        elif kind == "llama3":
            factor = float(sc["factor"])
            low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
            old = float(sc["original_max_position_embeddings"])
            low_wl, high_wl = old / low, old / high
            wavelen = 2 * math.pi / inv
            inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
            medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
            inv = torch.where(medium, smoothed, inv_l)
        else:
            raise NotImplementedError(f"rope type {kind!r} is not in this reference")
        self.inv_freq = inv
        self.kind = kind

    @property
    def is_mrope(self) -> bool:
        return self.mrope_section is not None

    def cos_sin(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (1-D) or [3, T] (M-RoPE: temporal, height, width) -> cos, sin [T, head_dim]."""
        if positions.dim() == 1:
            if self.is_mrope:   # text-only: the three components are equal, i.e. 1-D RoPE
                positions = positions[None].expand(3, -1)
            else:
                freqs = positions.float()[:, None] * self.inv_freq[None]
                emb = torch.cat((freqs, freqs), dim=-1)
                return emb.cos().to(dtype), emb.sin().to(dtype)
        if positions.dim() != 2 or positions.shape[0] != 3:
            raise ValueError(f"positions must be [T] or [3, T], got {tuple(positions.shape)}")
        if not self.is_mrope:
            raise ValueError("[3, T] positions given to a head whose config has no mrope_section")
        freqs = positions.float()[:, :, None] * self.inv_freq[None, None]          # [3, T, hd/2]
        if self.mrope_interleaved:   # Qwen3-VL: THWTHW... over the half-dimension
            f = freqs[0].clone()
            for dim, offset in ((1, 1), (2, 2)):
                idx = slice(offset, self.mrope_section[dim] * 3, 3)
                f[..., idx] = freqs[dim, ..., idx]
            emb = torch.cat((f, f), dim=-1)
        else:                        # Qwen2-VL / Qwen2.5-VL: contiguous T, H, W sections, repeated on both halves
            emb3 = torch.cat((freqs, freqs), dim=-1)                                 # [3, T, hd]
            chunks = emb3.split(self.mrope_section * 2, dim=-1)
            emb = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------------------------------------

def normalize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensor names of either layout -> one naming: the decoder layer under ``layer.``, the rest as published
    (``fc.weight``, ``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``, ``embed_tokens.weight``). Accepts
    ``midlayer.*`` (SpecForge), ``layers.0.*`` (speculators), and a leading ``model.`` on either."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        n = name[len("model."):] if name.startswith("model.") else name
        if n.startswith("midlayer."):
            n = "layer." + n[len("midlayer."):]
        elif n.startswith("layers.0."):
            n = "layer." + n[len("layers.0."):]
        elif n.startswith("layers.") or n.startswith("midlayers."):
            raise NotImplementedError(f"{name}: heads with more than one decoder layer are not in this reference")
        if n in out:
            raise ValueError(f"two tensors map to {n!r} (both layouts in one file?)")
        out[n] = t
    return out


class Eagle3Reference:
    """An EAGLE-3 head as vLLM's ``Eagle3LlamaForCausalLM`` computes it, built from a state dict and the head's
    config.json dict (either layout; or an already ``flat_config``'d dict). Everything runs in ``dtype``
    (float32 by default; float64 for tight comparisons)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], config: Mapping, dtype=torch.float32,
                 target_lm_head: torch.Tensor | None = None):
        self.raw_config = dict(config)
        cfg = dict(config) if "_layout" in config else flat_config(config)
        self.config = cfg
        self.layout = cfg["_layout"]
        self.dtype = dtype
        if int(cfg.get("num_hidden_layers", 1)) != 1:
            raise NotImplementedError("heads with more than one decoder layer are not in this reference")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r}")
        self.H = int(cfg["hidden_size"])
        self.Ht = int(cfg.get("target_hidden_size") or self.H)
        self.n_heads = int(cfg["num_attention_heads"])
        self.n_kv = int(cfg.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(cfg.get("head_dim") or self.H // self.n_heads)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.V = int(cfg["vocab_size"])
        self.Vd = int(cfg["draft_vocab_size"])
        self.norm_before_residual = bool(cfg["norm_before_residual"])
        self.rope = _Rope(cfg, self.head_dim)

        sd = normalize_state_dict(state_dict)
        missing = [n for n in ("fc.weight", "norm.weight") + tuple("layer." + t for t in LAYER_TENSORS)
                   if n not in sd]
        if missing:
            raise KeyError(f"head state dict lacks {missing}")
        # fresh, aligned copies: BLAS results on CPU can depend on a buffer's alignment, and safetensors hands out
        # views at arbitrary offsets, so the same numbers under other names could otherwise differ in the last bit
        w = {k: v.detach().to(dtype).clone() for k, v in sd.items() if k not in ("d2t", "t2d")}
        if "lm_head.weight" not in w:
            if target_lm_head is None:
                raise KeyError("head has no lm_head.weight; pass target_lm_head (only valid when draft vocab = "
                               "target vocab)")
            w["lm_head.weight"] = target_lm_head.detach().to(dtype).clone()
        self.w = w
        H, Ht, hd = self.H, self.Ht, self.head_dim
        expect = {
            "fc.weight": (H, 3 * Ht), "norm.weight": (H,), "lm_head.weight": (self.Vd, H),
            "layer.input_layernorm.weight": (H,), "layer.hidden_norm.weight": (H,),
            "layer.post_attention_layernorm.weight": (H,),
            "layer.self_attn.q_proj.weight": (self.n_heads * hd, 2 * H),
            "layer.self_attn.k_proj.weight": (self.n_kv * hd, 2 * H),
            "layer.self_attn.v_proj.weight": (self.n_kv * hd, 2 * H),
            "layer.self_attn.o_proj.weight": (H, self.n_heads * hd),
        }
        inter = int(cfg["intermediate_size"])
        expect.update({"layer.mlp.gate_proj.weight": (inter, H), "layer.mlp.up_proj.weight": (inter, H),
                       "layer.mlp.down_proj.weight": (H, inter)})
        if "embed_tokens.weight" in w:
            expect["embed_tokens.weight"] = (self.V, H)
        for name, shape in expect.items():
            if tuple(w[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(w[name].shape)}, config says {shape}")

        # draft -> target vocabulary (vLLM: targets = arange(Vd) + d2t)
        d2t = sd.get("d2t")
        if d2t is None:
            if self.Vd != self.V:
                raise KeyError(f"draft vocab {self.Vd} != target vocab {self.V} but the head has no d2t")
            self.draft_to_target_ids = torch.arange(self.V)
        else:
            if tuple(d2t.shape) != (self.Vd,):
                raise ValueError(f"d2t: shape {tuple(d2t.shape)}, expected ({self.Vd},)")
            tgt = torch.arange(self.Vd) + d2t.to(torch.int64)
            if int(tgt.min()) < 0 or int(tgt.max()) >= self.V:
                raise ValueError(f"d2t maps draft ids outside the target vocabulary [0, {self.V})")
            if tgt.unique().numel() != self.Vd:
                raise ValueError("d2t maps two draft ids onto one target id")
            self.draft_to_target_ids = tgt
        t2d = sd.get("t2d")
        if t2d is not None:
            if tuple(t2d.shape) != (self.V,):
                raise ValueError(f"t2d: shape {tuple(t2d.shape)}, expected ({self.V},)")
            mask = t2d.to(torch.bool)
            if int(mask.sum()) != self.Vd or not bool(mask[self.draft_to_target_ids].all()):
                raise ValueError("t2d does not mark exactly the target ids d2t maps to")
        self.t2d = t2d

    # -- pieces --------------------------------------------------------------------------------------------------
    def aux_indices(self, num_target_layers) -> tuple[int, ...]:
        """HF ``hidden_states`` indices this head reads (see ``aux_hidden_state_indices``)."""
        return aux_hidden_state_indices(self.raw_config, num_target_layers)

    @property
    def has_embed(self) -> bool:
        return "embed_tokens.weight" in self.w

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # vLLM RMSNorm / HF LlamaRMSNorm: in float32 (float64 when the reference runs in float64), back, * weight
        xf = x if x.dtype == torch.float64 else x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y if b is None else y + b

    def fuse(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """[T, 3 * target_hidden] -> [T, hidden]: ``fc`` (vLLM ``combine_hidden_states``)."""
        if aux_hidden_states.shape[-1] != 3 * self.Ht:
            raise ValueError(f"aux hidden states have width {aux_hidden_states.shape[-1]}, fc takes {3 * self.Ht}")
        return aux_hidden_states.to(self.dtype) @ self.w["fc.weight"].T

    def embed(self, ids, target_embed=None, source: str = "vllm") -> torch.Tensor:
        """Token embeddings. ``source="vllm"``: the head's own ``embed_tokens`` when it has one, else the target's
        input embedding (vLLM ``load_model``: "Detected EAGLE model with distinct embed_tokens weights. Keeping
        separate embedding weights"; shared when absent or identical). ``source="sglang"``: always the target's
        (SGLang ``EAGLEWorker.__init__``: ``self.draft_model_runner.model.set_embed(embed)`` for EAGLE3)."""
        if source not in ("vllm", "sglang"):
            raise ValueError("source must be 'vllm' or 'sglang'")
        ids = torch.as_tensor(ids, dtype=torch.long)
        if self.has_embed and not (source == "sglang" and target_embed is not None):
            table = self.w["embed_tokens.weight"]
        else:
            if target_embed is None:
                raise ValueError("the head has no embed_tokens: pass the target's input embedding")
            table = target_embed.weight if hasattr(target_embed, "weight") else target_embed
            if tuple(table.shape) != (self.V, self.H):
                raise ValueError(f"target embedding {tuple(table.shape)} does not fit the head ({self.V}, {self.H})")
        if int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]:
            raise ValueError("token id outside the embedding table")
        return table.detach().to(self.dtype)[ids]

    def layer(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decoder layer + the fused add of the final norm, over T rows with full causal attention among them
        (row t sees rows 0..t). embeds, hidden [T, H]; positions [T] or [3, T]. Returns the PRE-NORM output
        (vLLM ``hidden_prenorm``) [T, H]."""
        p = "layer."
        e = self._rms(embeds.to(self.dtype), self.w[p + "input_layernorm.weight"])
        hidden = hidden.to(self.dtype)
        if self.norm_before_residual:
            h = self._rms(hidden, self.w[p + "hidden_norm.weight"])
            residual = h
        else:
            residual = hidden
            h = self._rms(hidden, self.w[p + "hidden_norm.weight"])
        x = torch.cat([e, h], dim=-1)                                   # embeddings first, then hidden
        attn = self._attention(x, positions)
        residual = attn + residual                                      # post_attention_layernorm(h, residual)
        m = self._mlp(self._rms(residual, self.w[p + "post_attention_layernorm.weight"]))
        return m + residual                                             # norm(h, residual) -> prenorm

    def _attention(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        q = self._lin(x, "layer.self_attn.q_proj").view(T, nh, hd).transpose(0, 1)     # [nh, T, hd]
        k = self._lin(x, "layer.self_attn.k_proj").view(T, nkv, hd).transpose(0, 1)
        v = self._lin(x, "layer.self_attn.v_proj").view(T, nkv, hd).transpose(0, 1)
        cos, sin = self.rope.cos_sin(torch.as_tensor(positions), self.dtype)           # [T, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=0)                             # kv head j serves q heads j*rep..j*rep+rep-1
        v = v.repeat_interleave(rep, dim=0)
        scores = (q @ k.transpose(-1, -2)) * (hd ** -0.5)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(self.dtype)
        out = (probs @ v).transpose(0, 1).reshape(T, nh * hd)
        return self._lin(out, "layer.self_attn.o_proj")

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        g = self._lin(x, "layer.mlp.gate_proj")
        u = self._lin(x, "layer.mlp.up_proj")
        return self._lin(torch.nn.functional.silu(g) * u, "layer.mlp.down_proj")

    def draft_logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        """[T, H] pre-norm -> [T, draft_vocab]: ``lm_head(norm(h))``."""
        return self._rms(prenorm.to(self.dtype), self.w["norm.weight"]) @ self.w["lm_head.weight"].T

    def target_logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, target_vocab]: the draft logits at ``arange(Vd) + d2t``, ``-inf`` elsewhere (vLLM
        ``compute_logits``)."""
        d = self.draft_logits(prenorm)
        out = d.new_full((d.shape[0], self.V), float("-inf"))
        out[:, self.draft_to_target_ids] = d
        return out

    def to_target(self, draft_ids) -> torch.Tensor:
        """draft ids -> target ids: ``draft_id + d2t[draft_id]``."""
        return self.draft_to_target_ids[torch.as_tensor(draft_ids, dtype=torch.long)]


# ----------------------------------------------------------------------------------------------------------------
# drafting
# ----------------------------------------------------------------------------------------------------------------

def reference_draft(head: Eagle3Reference, target_embed, aux_hidden_states: torch.Tensor, prompt_ids, k: int, *,
                    next_token: int | None = None, positions: torch.Tensor | None = None,
                    return_details: bool = False, embed_source: str = "vllm",
                    row_embeds: torch.Tensor | None = None):
    """Greedy chain of ``k`` draft tokens (target ids) right after the target's prefill, as vLLM drafts it.

    ``aux_hidden_states``: [L, 3 * H] -- the target's aux hidden states of positions 0..L-1 (``stack_aux_hidden_
    states`` over HF ``output_hidden_states`` at ``head.aux_indices(...)``).
    ``prompt_ids``: either L + 1 ids (the L tokens whose states are given, then the target's own next token t_L,
    i.e. the argmax of the target's logits at position L-1), or L ids plus ``next_token=t_L``.
    ``positions``: the rotary positions of the L hidden states, [L] or (M-RoPE heads) [3, L]; default
    ``arange(L)``. For a Qwen-VL target pass the target's own 3-D position ids (image tokens included).
    ``target_embed``: the target's input embedding ([V, H] tensor or ``nn.Embedding``); used only when the head
    has no ``embed_tokens`` of its own (``embed_source="sglang"``: always, as SGLang does -- the two engines
    differ for a head whose own embedding differs from the target's). Image positions embed the placeholder token
    id like any other id.

    ``row_embeds``: [L, H] embeddings to use for the L prompt rows instead of embedding t_1..t_L (e.g. the
    target's merged input embeddings, image features at image positions: what SpecForge's Qwen-VL training feeds,
    SpecForge PR #102; vLLM as read does NOT do this). Draft rows are always embedded from their ids.

    Valid for any round, not only after the prefill: after verification vLLM re-runs the first pass over the
    accepted positions with the target's hidden states (overwriting the draft KV its own guesses wrote), so the
    draft after a round equals ``reference_draft`` over the whole committed sequence (its aux states, its ids
    and the target's new token).

    Alignment (vLLM ``input_ids[:n-1] = target_token_ids[1:]; input_ids[last] = next_token``, positions and
    hidden states unshifted):
        row i, i = 0..L-1:  token t_{i+1} (row L-1: t_L)  |  fc(aux_i)               |  position p_i
        row L-1 + j, j = 1..k-1:  draft token d_j        |  pre-norm output of row L-2+j  |  p_{L-1} + j
    Draft token d_j is the argmax over the target vocabulary (``-inf`` outside the draft vocabulary) of
    ``lm_head(norm(prenorm))`` at the last row. Every step re-runs the layer over all rows with full causal
    attention (rows never see later rows, so this equals vLLM's KV-cached computation).

    Returns the k target ids; with ``return_details`` a dict with ``draft_ids`` (list[int]), ``target_logits``
    [k, V], ``prenorm`` [L + k - 1, H] (the pre-norm outputs of every row), ``rows`` (tokens fed per row) and
    ``positions``."""
    if k < 1:
        raise ValueError("k must be >= 1")
    aux = torch.as_tensor(aux_hidden_states)
    if aux.dim() == 3:
        if aux.shape[0] != 1:
            raise ValueError("reference_draft takes one row (batch 1)")
        aux = aux[0]
    L = aux.shape[0]
    ids = [int(t) for t in torch.as_tensor(prompt_ids).reshape(-1).tolist()]
    if next_token is not None:
        if len(ids) != L:
            raise ValueError(f"with next_token, prompt_ids must hold L = {L} ids, got {len(ids)}")
        ids.append(int(next_token))
    elif len(ids) != L + 1:
        raise ValueError(f"prompt_ids must hold L + 1 = {L + 1} ids (prompt then the target's next token), "
                         f"got {len(ids)}; or pass next_token")
    if positions is None:
        pos = torch.arange(L)
    else:
        pos = torch.as_tensor(positions, dtype=torch.long)
        if pos.shape[-1] != L:
            raise ValueError(f"positions cover {pos.shape[-1]} rows, aux hidden states {L}")
    if pos.dim() == 1 and head.rope.is_mrope:
        pos = pos[None].expand(3, -1).clone()

    tokens = ids[1:]                         # row i carries token t_{i+1}
    hidden = head.fuse(aux)                  # fc once, on the target's states only
    drafted: list[int] = []
    step_logits = []
    prenorm = None
    if row_embeds is not None and tuple(row_embeds.shape) != (L, head.H):
        raise ValueError(f"row_embeds must be [{L}, {head.H}], got {tuple(row_embeds.shape)}")
    for _ in range(k):
        embeds = head.embed(tokens, target_embed, embed_source)
        if row_embeds is not None:
            embeds = torch.cat([row_embeds.to(head.dtype), embeds[L:]], dim=0)
        prenorm = head.layer(embeds, hidden, pos)
        logits = head.target_logits(prenorm[-1:])
        tok = int(logits[0].argmax())
        drafted.append(tok)
        step_logits.append(logits[0])
        # next row: the drafted token, the pre-norm output of the last row, the next position
        tokens = tokens + [tok]
        hidden = torch.cat([hidden, prenorm[-1:]], dim=0)
        pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    if not return_details:
        return drafted
    return {"draft_ids": drafted, "target_logits": torch.stack(step_logits), "prenorm": prenorm,
            "rows": tokens[:-1], "positions": pos[..., :-1]}
