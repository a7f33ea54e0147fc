"""EAGLE-3 heads for ``drafter_kind="eagle"``: the community's (SpecForge / vLLM and speculators layouts) and ours.

The math is vLLM's ``llama_eagle3.py`` (docs/EAGLE3_FORMATS.md has the conventions with their sources):
``fc`` fuses the target's residual stream entering three layers (HF ``hidden_states`` indices, ascending); one
decoder layer attends over ``cat(input_layernorm(embed(token)), hidden_norm(hidden))``; ``lm_head(norm(.))``
scores a draft vocabulary whose ids map to the target's through ``d2t`` (``target = draft + d2t[draft]``). Row t
of the head is (token t+1, fc(aux_t), position t) -- the same pairing the mmspec head uses, so the batch reuses
``EagleDraftBatch``; later draft steps feed the head's own PRE-norm output, not through ``fc``. Image placeholders
embed the placeholder id (vLLM ignores multimodal embeddings in the head); Qwen-VL heads (``mrope_section``) take
the target's 3-D positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.drafters.base import Drafter, RowSpec, never_drafted
from mmspec.drafters.eagle_batch import EagleDraftBatch, EagleRow, rotate_half
from mmspec.errors import MMSpecError
from mmspec.targets.base import TargetAdapter

SPECFORGE_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Qwen2_5vlForCausalLM",
                           "Eagle3Qwen3vlForCausalLM")
SPECULATORS_ARCHITECTURES = ("Eagle3DraftModel", "Eagle3Speculator")
LAYER_PREFIX = {"specforge": "midlayer.", "speculators": "layers.0."}
LAYER_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "num_hidden_layers", "hidden_act", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                    "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings")


# ----- configs ----------------------------------------------------------------------------------------------------
def layout_of(config: dict) -> str | None:
    """"speculators", "specforge" or None (not an EAGLE-3 head config)."""
    if config.get("speculators_model_type") is not None:
        return "speculators"
    archs = config.get("architectures") or []
    return "specforge" if any(a in SPECFORGE_ARCHITECTURES for a in archs) else None


def read_config(folder) -> dict | None:
    """The folder's config.json when it describes an EAGLE-3 head, else None."""
    path = Path(str(folder)) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MMSpecError(f"{path} is not readable JSON ({e})") from e
    return config if isinstance(config, dict) and layout_of(config) else None


def flat_config(config: dict, where="the head") -> dict:
    """One flat Llama-style dict for either layout, as vLLM builds it (speculators: ``transformer_layer_config``
    plus the top-level keys, ``norm_before_residual`` True when absent; SpecForge: False when absent)."""
    layout = layout_of(config)
    if layout == "speculators":
        if config["speculators_model_type"] != "eagle3":
            raise MMSpecError(f"{where}: speculators_model_type {config['speculators_model_type']!r} is not "
                              "eagle3; mmspec runs EAGLE-3 heads only")
        layer = config.get("transformer_layer_config")
        if not isinstance(layer, dict):
            raise MMSpecError(f"{where}: a speculators config needs a transformer_layer_config dict")
        flat = dict(layer)
        for key in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids"):
            if config.get(key) is not None:
                flat[key] = config[key]
        flat["norm_before_residual"] = bool(config.get("norm_before_residual", True))
        unsupported = [k for k in ("fc_norm", "norm_before_fc", "norm_output") if config.get(k)]
    else:
        flat = dict(config)
        flat["norm_before_residual"] = bool(config.get("norm_before_residual", False))
        unsupported = ["fc_norm"] * bool(config.get("fc_norm")) + ["norm_output=false"] * (
            config.get("norm_output", True) is False)
    if unsupported:
        raise MMSpecError(f"{where}: {', '.join(unsupported)} is not part of vLLM's EAGLE-3 head; mmspec cannot "
                          "run this head")
    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size") if k not in flat]
    if missing:
        raise MMSpecError(f"{where}: the EAGLE-3 config lacks {missing}")
    if int(flat.get("num_hidden_layers", 1)) != 1:
        raise MMSpecError(f"{where}: EAGLE-3 heads with {flat['num_hidden_layers']} layers are not supported (1)")
    if flat.get("hidden_act", "silu") != "silu":
        raise MMSpecError(f"{where}: hidden_act {flat['hidden_act']!r} is not supported (silu)")
    flat["draft_vocab_size"] = int(flat.get("draft_vocab_size") or flat["vocab_size"])
    flat["head_dim"] = int(flat.get("head_dim") or flat["hidden_size"] // flat["num_attention_heads"])
    flat["num_key_value_heads"] = int(flat.get("num_key_value_heads") or flat["num_attention_heads"])
    flat["target_hidden_size"] = int(flat.get("target_hidden_size") or flat["hidden_size"])
    flat["layout"] = layout
    return flat


def aux_layer_ids(config: dict, num_layers: int, where="the head") -> tuple[int, ...]:
    """The target's HF ``hidden_states`` indices feeding ``fc``, ascending. A top-level list is such indices
    (vLLM, speculators); one under ``eagle_config`` is written one lower (SpecForge / SGLang); both must agree;
    neither: ``(2, N // 2, N - 3)``."""
    top = config.get("eagle_aux_hidden_state_layer_ids")
    if top is None and isinstance(config.get("transformer_layer_config"), dict):
        top = config["transformer_layer_config"].get("eagle_aux_hidden_state_layer_ids")
    eagle_cfg = config.get("eagle_config") if isinstance(config.get("eagle_config"), dict) else {}
    lower = eagle_cfg.get("eagle_aux_hidden_state_layer_ids")
    from_top = sorted(int(i) for i in top) if top else None
    from_lower = sorted(int(i) + 1 for i in lower) if lower else None
    if from_top is not None and from_lower is not None and from_top != from_lower:
        raise MMSpecError(f"{where}: its config's aux layer lists disagree: top-level "
                          f"eagle_aux_hidden_state_layer_ids {list(top)} (HF hidden_states indices) vs eagle_config "
                          f"{list(lower)} (one lower, i.e. {from_lower}); fix one of them")
    ids = tuple(from_top or from_lower or sorted({2, num_layers // 2, num_layers - 3}))
    if len(ids) != 3 or len(set(ids)) != 3 or not all(1 <= i <= num_layers - 1 for i in ids):
        raise MMSpecError(f"{where}: aux layers {list(ids)} are not three distinct layers of this "
                          f"{num_layers}-layer target (HF hidden_states indices in [1, {num_layers - 1}])")
    return ids


# ----- the head ---------------------------------------------------------------------------------------------------
class Eagle3Head(nn.Module):
    """fc over three aux hidden states, one decoder layer over [norm(embed), norm(hidden)], norm, lm_head over the
    draft vocabulary. Parameter names are the layouts' with the layer under ``layer.``."""

    def __init__(self, flat: dict):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

        self.flat = dict(flat)
        H, Ht, V, Vd = flat["hidden_size"], flat["target_hidden_size"], flat["vocab_size"], flat["draft_vocab_size"]
        nh, nkv, hd, inter = (flat["num_attention_heads"], flat["num_key_value_heads"], flat["head_dim"],
                              flat["intermediate_size"])
        eps = float(flat.get("rms_norm_eps", 1e-6))
        bias, mlp_bias = bool(flat.get("attention_bias")), bool(flat.get("mlp_bias"))
        self.norm_before_residual = bool(flat["norm_before_residual"])
        self.H = H
        self.fc = nn.Linear(3 * Ht, H, bias=False)
        self.layer = nn.Module()
        for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            setattr(self.layer, name, LlamaRMSNorm(H, eps))
        attn = self.layer.self_attn = nn.Module()
        attn.q_proj = nn.Linear(2 * H, nh * hd, bias=bias)
        attn.k_proj = nn.Linear(2 * H, nkv * hd, bias=bias)
        attn.v_proj = nn.Linear(2 * H, nkv * hd, bias=bias)
        attn.o_proj = nn.Linear(nh * hd, H, bias=bias)
        mlp = self.layer.mlp = nn.Module()
        mlp.gate_proj = nn.Linear(H, inter, bias=mlp_bias)
        mlp.up_proj = nn.Linear(H, inter, bias=mlp_bias)
        mlp.down_proj = nn.Linear(inter, H, bias=mlp_bias)
        self.norm = LlamaRMSNorm(H, eps)
        self.lm_head = nn.Linear(H, Vd, bias=False)
        self.register_buffer("d2t", torch.zeros(Vd, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(V, dtype=torch.bool))
        self.embed_tokens = nn.Embedding(V, H) if flat.get("_has_embed") else None
        self.n_heads, self.n_kv, self.head_dim = nh, nkv, hd
        # the head's KV cache (``kv.SlotCache``) and rotary frequencies come from a one-layer Llama config
        scaling = flat.get("rope_scaling") or {}
        keys = {k: flat[k] for k in ("rope_theta", "rope_scaling") if flat.get(k) is not None}
        if scaling.get("mrope_section"):
            keys.pop("rope_scaling")   # M-RoPE is computed here (``_rope``); the config only shapes the cache
        self.layer_cfg = LlamaConfig(hidden_size=H, intermediate_size=inter, num_attention_heads=nh,
                                     num_key_value_heads=nkv, head_dim=hd, num_hidden_layers=1, rms_norm_eps=eps,
                                     max_position_embeddings=int(flat.get("max_position_embeddings", 4096)),
                                     vocab_size=V, **keys)
        self.layer_cfg._attn_implementation = "sdpa"
        self.mrope_section = list(scaling["mrope_section"]) if scaling.get("mrope_section") else None
        self.mrope_interleaved = bool(scaling.get("mrope_interleaved"))
        if self.mrope_section is None:
            rotary = LlamaRotaryEmbedding(self.layer_cfg)
            inv, self.rope_scale = rotary.inv_freq, float(rotary.attention_scaling)
        else:   # M-RoPE (Qwen-VL targets): default frequencies, split over temporal/height/width sections
            theta = float(flat.get("rope_theta") or 10000.0)
            inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
            self.rope_scale = 1.0
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self.cfg = {"hidden_size": H}   # what EagleDraftBatch reads

    @property
    def draft_to_target(self) -> torch.Tensor:
        return torch.arange(self.d2t.shape[0], device=self.d2t.device) + self.d2t

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] or [3, B, T] -> cos, sin [B, 1, T, head_dim] (float32)."""
        if self.mrope_section is None or pos.dim() == 2:
            freqs = pos.float()[..., None] * self.inv_freq   # (1-D positions on an M-RoPE head: the axes agree)
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            freqs = pos.float()[..., None] * self.inv_freq                     # [3, B, T, hd/2]
            if self.mrope_interleaved:   # Qwen3-VL: THWTHW... over the half-dimension
                f = freqs[0].clone()
                for axis in (1, 2):
                    idx = slice(axis, self.mrope_section[axis] * 3, 3)
                    f[..., idx] = freqs[axis, ..., idx]
                emb = torch.cat((f, f), dim=-1)
            else:                        # Qwen2/2.5-VL: contiguous sections, repeated on both halves
                emb3 = torch.cat((freqs, freqs), dim=-1)
                emb = torch.cat([c[i % 3] for i, c in enumerate(emb3.split(self.mrope_section * 2, dim=-1))], -1)
        return (emb.cos() * self.rope_scale)[:, None], (emb.sin() * self.rope_scale)[:, None]

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, mask, positions: torch.Tensor,
                cache=None) -> torch.Tensor:
        """embeds, hidden [B, T, H] (hidden: fc(aux) for the target's rows, the head's own pre-norm output for
        drafted ones) -> the PRE-norm output [B, T, H]."""
        layer, attn = self.layer, self.layer.self_attn
        e = layer.input_layernorm(embeds)
        if self.norm_before_residual:
            h = residual = layer.hidden_norm(hidden)
        else:
            residual, h = hidden, layer.hidden_norm(hidden)
        x = torch.cat([e, h.to(e.dtype)], dim=-1)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        cos, sin = self._rope(positions)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, 0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None and T > 1,
                                           enable_gqa=k.shape[1] != q.shape[1])
        residual = attn.o_proj(o.transpose(1, 2).reshape(B, T, -1)) + residual
        mlp = layer.mlp
        h = layer.post_attention_layernorm(residual)
        return mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)) + residual

    def draft_logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., draft_vocab]."""
        return self.lm_head(self.norm(prenorm))

    def aux_layers(self, num_layers: int, where="the head") -> tuple[int, ...]:
        return aux_layer_ids(self.flat.get("_config") or self.flat, num_layers, where)

    # ----- files --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder) -> "Eagle3Head":
        from safetensors.torch import load_file

        folder = Path(str(folder))
        config = read_config(folder)
        if config is None:
            raise MMSpecError(f"{folder} is not an EAGLE-3 head (its config.json names no EAGLE-3 architecture and "
                              "no speculators_model_type)")
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise MMSpecError(f"{folder}: an EAGLE-3 config but no *.safetensors weights")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        state = canonical_names(state, str(folder))
        flat = flat_config(config, str(folder))
        flat["_has_embed"] = "embed_tokens.weight" in state
        flat["_config"] = config
        head = cls(flat)
        head.load_checked(state, str(folder))
        return head

    def load_checked(self, state: dict, where: str) -> None:
        """Load ``state`` (canonical names), refusing a missing, extra or mis-shaped tensor by name."""
        own = self.state_dict()
        state = dict(state)
        if "d2t" not in state and own["d2t"].shape[0] == own["t2d"].shape[0]:
            state["d2t"] = torch.zeros_like(own["d2t"])   # no draft vocabulary (speculators omits it): the identity
        if "t2d" not in state and "d2t" in state:         # read by no engine: derived from d2t
            state["t2d"] = torch.zeros_like(own["t2d"])
            ids = torch.arange(state["d2t"].shape[0]) + state["d2t"].long()
            if ids.numel() and int(ids.min()) >= 0 and int(ids.max()) < state["t2d"].shape[0]:
                state["t2d"][ids] = True
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise MMSpecError(f"{where}: the EAGLE-3 weights do not match its config (missing {missing[:4]}, "
                              f"unexpected {extra[:4]})")
        for name, t in own.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise MMSpecError(f"{where}: tensor {name} has shape {tuple(state[name].shape)} but the config says "
                                  f"{tuple(t.shape)}")
        ids = torch.arange(state["d2t"].shape[0]) + state["d2t"].long()
        V = own["t2d"].shape[0]
        if int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != ids.numel():
            raise MMSpecError(f"{where}: d2t maps draft ids outside the target vocabulary [0, {V}) or onto one id twice")
        if not torch.equal(state["t2d"].bool().nonzero().flatten(), ids.sort().values):
            raise MMSpecError(f"{where}: t2d does not mark exactly the target ids d2t maps to")
        self.load_state_dict({k: v.to(own[k].dtype) if k != "d2t" else v.long() for k, v in state.items()})


def canonical_names(state: dict, where: str) -> dict:
    """Tensor names of either layout (``midlayer.*``, ``layers.0.*``, an optional ``model.`` prefix) -> ours."""
    out = {}
    for name, t in state.items():
        n = name[len("model."):] if name.startswith("model.") else name
        for prefix in LAYER_PREFIX.values():
            if n.startswith(prefix):
                n = "layer." + n[len(prefix):]
        if n.startswith("layers.") or n.startswith("midlayers."):
            raise MMSpecError(f"{where}: tensor {name}: EAGLE-3 heads with more than one layer are not supported")
        if n in out:
            raise MMSpecError(f"{where}: two tensors map to {n} (both layouts in one folder?)")
        out[n] = t
    return out


def export_head(head: Eagle3Head, folder, layout: str, target: str, target_config, aux_ids,
                dtype: torch.dtype = torch.float32, extra: dict | None = None) -> None:
    """Write ``head`` as vLLM / SGLang load it: ``layout`` "specforge" (``LlamaForCausalLMEagle3``, ``midlayer.*``,
    aux ids top-level AND under ``eagle_config`` one lower, so every engine reads the same layers) or
    "speculators" (``Eagle3DraftModel``, ``layers.0.*``, ``norm_before_residual`` explicit). No ``embed_tokens``:
    the engines then share the target's (as mmspec does)."""
    from safetensors.torch import save_file

    if layout not in LAYER_PREFIX:
        raise MMSpecError(f"unknown EAGLE-3 layout {layout!r}; choose one of {sorted(LAYER_PREFIX)}")
    folder = Path(str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    f = head.flat
    prefix = LAYER_PREFIX[layout]
    tensors = {}
    for name, t in head.state_dict().items():
        if name.startswith("embed_tokens."):
            continue
        t = t.detach().cpu()
        t = t if name in ("d2t", "t2d") else t.to(dtype)
        tensors[(prefix + name[len("layer."):]) if name.startswith("layer.") else name] = t.contiguous()
    layer = {k: f[k] for k in LAYER_SHAPE_KEYS if f.get(k) is not None}
    layer.update(num_hidden_layers=1, hidden_act="silu", tie_word_embeddings=False, model_type="llama",
                 torch_dtype=str(dtype).replace("torch.", ""))
    aux = [int(i) for i in sorted(aux_ids)]
    target_type = getattr(target_config, "model_type", None)
    if layout == "specforge":
        config = {"architectures": ["LlamaForCausalLMEagle3"], **layer, "draft_vocab_size": f["draft_vocab_size"],
                  "target_hidden_size": f["target_hidden_size"], "eagle_aux_hidden_state_layer_ids": aux,
                  "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux],
                                   "use_aux_hidden_state": True},
                  "target_model_type": target_type, "target": target}
        if head.norm_before_residual:
            config["norm_before_residual"] = True
    else:
        config = {"architectures": ["Eagle3DraftModel"], "speculators_model_type": "eagle3",
                  "speculators_version": "0.9.0",
                  "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                         "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5,
                                                               "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                                         "verifier": {"name_or_path": target,
                                                      "architectures": list(target_config.architectures or [])}},
                  "transformer_layer_config": layer, "draft_vocab_size": f["draft_vocab_size"],
                  "target_hidden_size": f["target_hidden_size"], "norm_before_residual": head.norm_before_residual,
                  "norm_before_fc": False, "fc_norm": False, "norm_output": False, "embed_requires_grad": False,
                  "eagle_aux_hidden_state_layer_ids": aux, "torch_dtype": layer["torch_dtype"]}
    config.update(extra or {})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def head_for_target(adapter: TargetAdapter, vocab: list[int] | None, intermediate_size: int | None = None,
                    aux_ids=None) -> Eagle3Head:
    """A new (random) EAGLE-3 head shaped for ``adapter``'s target (ours: ``mmspec train-drafter --kind eagle``);
    ``vocab``: the sorted target ids of its draft vocabulary (None: the whole vocabulary)."""
    text = adapter.model.config.get_text_config()
    heads = int(text.num_attention_heads)
    n = int(text.num_hidden_layers)
    rope = getattr(text, "rope_parameters", None) or {}
    flat = {"hidden_size": int(text.hidden_size), "intermediate_size": int(intermediate_size or text.intermediate_size),
            "num_attention_heads": heads, "num_key_value_heads": int(getattr(text, "num_key_value_heads", heads) or heads),
            "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // heads),
            "rms_norm_eps": float(getattr(text, "rms_norm_eps", 1e-6)), "vocab_size": int(adapter.vocab_size),
            "max_position_embeddings": int(getattr(text, "max_position_embeddings", 4096)),
            "rope_theta": float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0) or 10000.0)),
            "draft_vocab_size": len(vocab) if vocab else int(adapter.vocab_size), "norm_before_residual": False,
            "target_hidden_size": int(text.hidden_size), "layout": "specforge"}
    # M-RoPE sections that cover the head (Qwen2/3-VL); a partial rotary one (Qwen3.5: a quarter of the head) does
    # not fit the head's full rotary, which then takes 1-D positions
    if rope.get("mrope_section") and 2 * sum(rope["mrope_section"]) == flat["head_dim"]:
        flat["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
    flat["eagle_aux_hidden_state_layer_ids"] = list(aux_ids or aux_layer_ids({}, n, "the target"))
    head = Eagle3Head(flat)
    if vocab:
        ids = torch.tensor(sorted(vocab), dtype=torch.long)
        head.d2t.copy_(ids - torch.arange(ids.numel()))
        head.t2d[ids] = True
    else:
        head.t2d.fill_(True)
    return head


# ----- the drafter -------------------------------------------------------------------------------------------------
class Eagle3Drafter(Drafter):
    """An EAGLE-3 head drafting for its target (kind ``eagle``; ``EagleDrafter.from_pretrained`` picks it)."""

    kind = "eagle"
    default_k = 4
    needs_weights = True
    grows_trees = True
    default_tree_nodes = 32

    def __init__(self, target: TargetAdapter, head: Eagle3Head, where="the given head"):
        super().__init__(target)
        text = target.model.config.get_text_config()
        n = int(text.num_hidden_layers)
        f = head.flat
        problems = []
        if f["target_hidden_size"] != text.hidden_size:
            problems.append(f"fc takes 3 x {f['target_hidden_size']} target features, the target's hidden size is "
                            f"{text.hidden_size}")
        if f["vocab_size"] != target.vocab_size:
            problems.append(f"vocab_size {f['vocab_size']} vs the target's {target.vocab_size}")
        if head.embed_tokens is None and f["hidden_size"] != text.hidden_size:
            problems.append(f"hidden size {f['hidden_size']} with no embed_tokens of its own, so it needs the "
                            f"target's embedding of width {text.hidden_size}")
        if problems:
            raise MMSpecError(f"the EAGLE-3 head in {where} does not fit this target: {'; '.join(problems)}")
        self.aux_layers = head.aux_layers(n, str(where))
        self.head = head.to(target.device, target.model.dtype).eval()
        self.model = self.head
        self.embed = head.embed_tokens or target.model.get_input_embeddings()
        self.draft_to_target = self.head.draft_to_target
        self.mrope = head.mrope_section is not None
        self.prior_acceptance = float((f.get("_config") or {}).get("acceptance") or Drafter.prior_acceptance)
        self.bad_ids = never_drafted(target)

    @classmethod
    def from_pretrained(cls, target: TargetAdapter, path, dtype, trust_remote_code: bool = False) -> "Eagle3Drafter":
        return cls(target, Eagle3Head.from_pretrained(path), where=str(path))

    def logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        """[..., H] pre-norm outputs -> [..., target vocab] float32, -inf outside the draft vocabulary."""
        small = self.head.draft_logits(prenorm).float()
        full = torch.full(small.shape[:-1] + (self.target.vocab_size,), float("-inf"), device=small.device)
        full[..., self.draft_to_target] = small
        return full.masked_fill(self.bad_ids, float("-inf"))

    def batch(self) -> "Eagle3DraftBatch":
        return Eagle3DraftBatch(self)


@dataclass
class Eagle3Row(EagleRow):
    positions: object = None   # the target's ``Positions`` of the row (M-RoPE heads read its 3-D rows)


class Eagle3DraftBatch(EagleDraftBatch):
    """``EagleDraftBatch`` with EAGLE-3's inputs: the target hands over its aux hidden states (``wants_hidden`` =
    their HF indices), fused by ``fc`` once; prompt rows embed their token ids, image placeholders included."""

    def __init__(self, drafter: Eagle3Drafter):
        super().__init__(drafter)
        self.wants_hidden = drafter.aux_layers

    def _open(self, row, spec: RowSpec) -> Eagle3Row:
        adapter = self.drafter.target
        with torch.inference_mode():
            ids = torch.tensor(spec.request.prompt_ids, device=self.device)
            return Eagle3Row(self.drafter.embed(ids), positions=adapter.positions(spec.request))

    def _append(self, row, emitted: list[int], kept: int, hidden: torch.Tensor | None) -> None:
        with torch.inference_mode():
            super()._append(row, emitted, kept, self.head.fc(hidden.to(self.head.fc.weight.dtype)))

    def _model(self, slots, x: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        mask, pos = slots.extend(parents, **tree)
        if self.drafter.mrope:   # the target's own 3-D positions of each row (rows 1-3 of its [4, n])
            rows = [self.state[r].positions(pos[b]) for b, r in enumerate(slots.rows)]
            if rows and rows[0].shape[0] == 4:
                pos = torch.stack([p[1:] for p in rows], dim=1)
        return self.head(x[..., :self.H], x[..., self.H:], mask, pos.to(self.device), slots.cache)


__all__ = ["Eagle3DraftBatch", "Eagle3Drafter", "Eagle3Head", "aux_layer_ids", "export_head", "flat_config",
           "head_for_target", "layout_of", "read_config"]
