"""Tiny random EAGLE-3 heads written in the two published layouts, and a loader into ``Eagle3Reference``.

No mmspec imports: these files are what the real tools write, so mmspec's loader is tested against the formats,
not against itself. See ``docs/EAGLE3_FORMATS.md`` for the layouts side by side and where each key comes from.

SpecForge / vLLM-native layout (what SpecForge's ``export/to_sglang.py`` / ``save_pretrained`` writes, what vLLM
and SGLang load as ``LlamaForCausalLMEagle3``): a flat Llama ``config.json`` (``architectures``
``["LlamaForCausalLMEagle3"]``, ``model_type: "llama"``, ``num_hidden_layers: 1``, ``vocab_size`` = the TARGET's
vocabulary, ``draft_vocab_size``, optional ``eagle_config: {eagle_aux_hidden_state_layer_ids (one lower),
use_aux_hidden_state}``, ``rope_scaling`` with ``mrope_section`` for Qwen-VL targets); tensors ``fc.weight``,
``midlayer.*``, ``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``; no ``embed_tokens`` by default (SpecForge's
SGLang export drops every tensor whose name contains "embed": ``specforge/export/to_sglang.py:85``).

speculators layout (``Eagle3DraftModel.save_pretrained``; vLLM reads it through ``SpeculatorsConfig``):
``architectures ["Eagle3DraftModel"]``, ``speculators_model_type: "eagle3"``, ``speculators_version``,
``speculators_config`` (``algorithm``, ``proposal_methods`` [greedy, ``speculative_tokens``],
``default_proposal_method``, ``verifier`` {``name_or_path``, ``architectures``}), ``transformer_layer_config``
(the Llama layer config, ``vocab_size`` = target vocabulary), top-level ``draft_vocab_size``,
``norm_before_residual``, ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids`` (HF hidden_states indices),
``norm_before_fc``, ``fc_norm``, ``norm_output``, ``embed_requires_grad``; tensors ``fc.weight``, ``layers.0.*``,
``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``, ``embed_tokens.weight`` (speculators saves the verifier's
embedding copy; ``verifier_lm_head``/``verifier_norm`` are not saved: ``core.py`` ``_keys_to_ignore_on_save``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tests.eagle3_reference import (LAYER_TENSORS, SPECFORGE_ARCHITECTURES, SPECULATORS_ARCHITECTURES,
                                    Eagle3Reference, detect_layout)

LAYOUTS = ("specforge", "speculators")
AUX_CONVENTIONS = ("top", "eagle_config", "both", "none")
DEFAULT = object()   # "as the real tool writes it"

LAYER_PREFIX = {"specforge": "midlayer.", "speculators": "layers.0."}


# ----------------------------------------------------------------------------------------------------------------
# the target's shape
# ----------------------------------------------------------------------------------------------------------------

def target_text_config(target_config) -> dict:
    """The target's text-decoder config as a plain dict: a transformers config (``get_text_config``), a
    config.json dict (``text_config`` taken when present), or a folder holding config.json."""
    if isinstance(target_config, (str, Path)):
        target_config = json.loads((Path(target_config) / "config.json").read_text())
    if hasattr(target_config, "get_text_config"):
        target_config = target_config.get_text_config()
    if hasattr(target_config, "to_dict"):
        d = target_config.to_dict()
        for key in ("rope_parameters", "rope_scaling", "rope_theta", "head_dim"):   # properties / computed
            if d.get(key) is None and getattr(target_config, key, None) is not None:
                d[key] = getattr(target_config, key)
        return d
    d = dict(target_config)
    if isinstance(d.get("text_config"), Mapping):
        d = dict(d["text_config"])
    return d


def _top_model_type(target_config) -> str | None:
    """The target's own model_type (``qwen2_5_vl``, ``llava``), not its text decoder's."""
    if isinstance(target_config, (str, Path)):
        target_config = json.loads((Path(target_config) / "config.json").read_text())
    if isinstance(target_config, Mapping):
        return target_config.get("model_type")
    return getattr(target_config, "model_type", None)


def default_aux_ids(num_layers: int) -> tuple[int, int, int]:
    """HF hidden_states indices for a tiny target: the ecosystem default (2, N // 2, N - 3) where that names
    three distinct layers in [1, N - 1], else the last three layer inputs (N - 3, N - 2, N - 1)."""
    n = num_layers
    ids = (2, n // 2, n - 3)
    if len(set(ids)) == 3 and list(ids) == sorted(ids) and ids[0] >= 1 and ids[-1] <= n - 1:
        return ids
    if n < 4:
        raise ValueError(f"a {n}-layer target has fewer than three distinct capturable layers in [1, {n - 1}]: "
                         "EAGLE-3 needs a target with at least 4 decoder layers")
    return (n - 3, n - 2, n - 1)


def _rope_keys(text: Mapping) -> dict:
    """RoPE keys as a transformers-4-era config writes them (``rope_theta`` + ``rope_scaling``; what SpecForge
    exports, mirrored from ``rope_parameters`` by ``export/checkpoint_io.py:32`` ``apply_legacy_rope_scaling``)."""
    params = text.get("rope_parameters")
    theta = text.get("rope_theta")
    scaling = text.get("rope_scaling")
    if isinstance(params, Mapping):
        theta = params.get("rope_theta", theta)
        if not scaling:
            kind = params.get("rope_type", params.get("type"))
            if params.get("mrope_section") or kind not in (None, "default"):
                scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    out = {"rope_theta": float(theta if theta is not None else 10000.0)}
    scaling = {k: v for k, v in dict(scaling or {}).items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type")) in (None, "default") and not scaling.get("mrope_section"):
        scaling = {}       # plain RoPE: no rope_scaling key, as transformers 4 writes it
    if scaling.get("mrope_section"):
        # exactly what SpecForge's configs/qwen2-5-vl-7b-eagle3.json writes (+ Qwen3-VL's interleave flag)
        mrope = {"type": "mrope", "mrope_section": list(scaling["mrope_section"])}
        if scaling.get("mrope_interleaved"):
            mrope["mrope_interleaved"] = True
        scaling = mrope
    if scaling:
        out["rope_scaling"] = scaling
    return out


# ----------------------------------------------------------------------------------------------------------------
# writing a head
# ----------------------------------------------------------------------------------------------------------------

def vocab_selection(target_vocab: int, draft_vocab: int, seed: int = 0, counts=None) -> torch.Tensor:
    """A VocabTrim-style draft vocabulary: the ``draft_vocab`` most frequent target ids, SORTED (SpecForge
    ``process_token_dict_to_mappings``). ``counts`` [target_vocab] token frequencies; default: seeded random
    frequencies (so the selection is scattered over the target vocabulary, never a prefix)."""
    if not 1 <= draft_vocab <= target_vocab:
        raise ValueError(f"draft vocab {draft_vocab} must be in [1, {target_vocab}]")
    if counts is None:
        g = torch.Generator().manual_seed(seed + 7919)
        counts = torch.rand(target_vocab, generator=g)
    counts = torch.as_tensor(counts, dtype=torch.float64)
    top = torch.topk(counts, draft_vocab, sorted=True).indices        # ties: topk is deterministic on CPU
    return top.sort().values


def vocab_buffers(selected: torch.Tensor, target_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t int64 [Vd], t2d bool [V]) for sorted target ids ``selected``: ``d2t[i] = selected[i] - i``."""
    selected = torch.as_tensor(selected, dtype=torch.int64)
    d2t = selected - torch.arange(selected.numel(), dtype=torch.int64)
    t2d = torch.zeros(target_vocab, dtype=torch.bool)
    t2d[selected] = True
    return d2t, t2d


def random_head_tensors(text: Mapping, draft_vocab: int, *, intermediate_size: int | None = None,
                        with_embed: bool = False, seed: int = 0, scale: float = 1.0, fc_scale: float = 1.0,
                        dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in canonical names (layer tensors under ``layer.``). Weights are large enough that the
    head's argmaxes are far from ties; norms are near 1 but not exactly 1, so a swapped norm shows."""
    g = torch.Generator().manual_seed(seed)
    H = int(text["hidden_size"])
    nh = int(text["num_attention_heads"])
    nkv = int(text.get("num_key_value_heads") or nh)
    hd = int(text.get("head_dim") or H // nh)
    inter = int(intermediate_size or text.get("intermediate_size") or 2 * H)
    V = int(text["vocab_size"])

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=g) * (scale / cols ** 0.5)).to(dtype)

    def norm_w(n):
        return (1.0 + 0.2 * torch.randn(n, generator=g)).to(dtype)

    t = {
        "fc.weight": mat(H, 3 * H) * fc_scale,
        "layer.input_layernorm.weight": norm_w(H),
        "layer.hidden_norm.weight": norm_w(H),
        "layer.post_attention_layernorm.weight": norm_w(H),
        "layer.self_attn.q_proj.weight": mat(nh * hd, 2 * H) * 2.0,
        "layer.self_attn.k_proj.weight": mat(nkv * hd, 2 * H) * 2.0,
        "layer.self_attn.v_proj.weight": mat(nkv * hd, 2 * H),
        "layer.self_attn.o_proj.weight": mat(H, nh * hd),
        "layer.mlp.gate_proj.weight": mat(inter, H),
        "layer.mlp.up_proj.weight": mat(inter, H),
        "layer.mlp.down_proj.weight": mat(H, inter),
        "norm.weight": norm_w(H),
        "lm_head.weight": mat(draft_vocab, H) * 4.0,
    }
    if with_embed:
        t["embed_tokens.weight"] = torch.randn(V, H, generator=g).to(dtype)
    return t


def _layout_tensors(canonical: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    prefix = LAYER_PREFIX[layout]
    return {(prefix + n[len("layer."):] if n.startswith("layer.") else n): v.contiguous()
            for n, v in canonical.items()}


def _aux_config(layout: str, aux_ids: Sequence[int], convention: str) -> tuple[list | None, list | None]:
    """(top-level list, eagle_config list) for HF hidden_states indices ``aux_ids``."""
    top = [int(i) for i in aux_ids]
    lower = [int(i) - 1 for i in aux_ids]
    if convention == "top":
        return top, None
    if convention == "eagle_config":
        return None, lower
    if convention == "both":
        return top, lower
    if convention == "none":
        return None, None
    raise ValueError(f"aux_convention must be one of {AUX_CONVENTIONS}")


def write_head(folder, layout: str = "specforge", target_config=None, *, draft_vocab: int | None = None,
               aux_ids: Sequence[int] | None = None, aux_convention: str | None = None,
               norm_before_residual=DEFAULT, with_embed: bool | None = None, architecture: str | None = None,
               intermediate_size: int | None = None, selected_ids=None, seed: int = 0, scale: float = 1.0,
               fc_scale: float = 1.0,
               target_name: str = "tiny-target", tensors: Mapping[str, torch.Tensor] | None = None,
               dtype=torch.float32, extra_config: Mapping | None = None) -> Path:
    """Write a TINY random EAGLE-3 head for ``target_config`` into ``folder`` (config.json + model.safetensors)
    in ``layout`` ("specforge" | "speculators"). The head has the target's hidden size, heads, head_dim and
    vocabulary, one decoder layer, and a NON-TRIVIAL draft vocabulary (default: half the target's, a scattered
    VocabTrim-like selection, so ``d2t`` is not all zeros).

    ``aux_ids``: HF ``hidden_states`` indices of the three aux layers (default ``default_aux_ids(N)``).
    ``aux_convention``: where to write them: "top" (top-level ``eagle_aux_hidden_state_layer_ids``, as written:
    speculators/vLLM), "eagle_config" (``eagle_config.eagle_aux_hidden_state_layer_ids``, one lower:
    SpecForge/SGLang), "both" (consistent), "none" (defaults apply: use only when ``aux_ids`` IS the default).
    Default: "eagle_config" for specforge, "top" for speculators -- what each tool writes.
    ``norm_before_residual``: ``DEFAULT`` = as the tool writes it (SpecForge: key absent, i.e. False;
    speculators: ``false`` written); True/False = written explicitly; None = key absent (speculators -> True in
    vLLM!). ``with_embed``: default False for specforge (SpecForge's export drops it), True for speculators.
    ``scale`` / ``fc_scale``: multipliers on the random matrices / on ``fc`` (a smaller ``fc_scale`` weakens the
    residual stream when the target's hidden states are large). Random heads tend to repeat one token after a
    step or two, so compare the per-step ``target_logits`` (finite entries), not only the ids.
    ``tensors``: canonical weights to write instead of random ones (``layer.*`` names, as
    ``random_head_tensors`` returns), so both layouts can carry the same numbers.
    ``extra_config``: keys merged into config.json (top level) last, e.g. to write a mis-shaped or conflicting
    config on purpose."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    if target_config is None:
        raise ValueError("write_head needs the target's config (transformers config, dict or folder)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = target_text_config(target_config)
    target_model_type = _top_model_type(target_config) or text.get("model_type")
    n_layers = int(text["num_hidden_layers"])
    V = int(text["vocab_size"])
    H = int(text["hidden_size"])
    nh = int(text["num_attention_heads"])
    nkv = int(text.get("num_key_value_heads") or nh)
    hd = int(text.get("head_dim") or H // nh)
    inter = int(intermediate_size or text.get("intermediate_size") or 2 * H)
    if draft_vocab is None:
        draft_vocab = max(2, V // 2)
    if aux_convention is None:
        aux_convention = "eagle_config" if layout == "specforge" else "top"
    if aux_convention == "none":
        # no ids written: every engine falls back to (2, N // 2, N - 3), so the head must have been trained on it
        eco = (2, n_layers // 2, n_layers - 3)
        if len(set(eco)) != 3 or list(eco) != sorted(eco) or eco[-1] > n_layers - 1:
            raise ValueError(f"aux_convention='none' needs a target whose default layers (2, N // 2, N - 3) = {eco} "
                             f"are three distinct layers: N >= 7 (this target has N = {n_layers})")
        if aux_ids is not None and tuple(aux_ids) != eco:
            raise ValueError(f"aux_convention='none' writes no ids, so aux_ids must be the default {eco}")
        aux_ids = eco
    aux_ids = tuple(int(i) for i in (aux_ids if aux_ids is not None else default_aux_ids(n_layers)))
    if with_embed is None:
        with_embed = layout == "speculators"

    selected = (torch.as_tensor(selected_ids, dtype=torch.int64).sort().values if selected_ids is not None
                else vocab_selection(V, draft_vocab, seed=seed))
    if selected.numel() != draft_vocab:
        raise ValueError(f"selected_ids has {selected.numel()} ids, draft_vocab is {draft_vocab}")
    d2t, t2d = vocab_buffers(selected, V)

    canonical = dict(tensors) if tensors is not None else random_head_tensors(
        dict(text, intermediate_size=inter), draft_vocab, with_embed=with_embed, seed=seed, scale=scale,
        fc_scale=fc_scale, dtype=dtype)
    if not with_embed:
        canonical.pop("embed_tokens.weight", None)
    elif "embed_tokens.weight" not in canonical:
        raise ValueError("with_embed=True but the given tensors have no embed_tokens.weight")
    canonical = {k: v.to(dtype) for k, v in canonical.items()}
    canonical["d2t"] = d2t
    canonical["t2d"] = t2d
    tensors_out = _layout_tensors(canonical, layout)

    top, lower = _aux_config(layout, aux_ids, aux_convention)
    rope = _rope_keys(text)
    dtype_name = str(dtype).replace("torch.", "")
    layer_cfg = {
        "hidden_size": H, "intermediate_size": inter, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "head_dim": hd, "num_hidden_layers": 1, "hidden_act": "silu",
        "rms_norm_eps": float(text.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(text.get("max_position_embeddings", 2048)),
        "vocab_size": V, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": text.get("bos_token_id"), "eos_token_id": text.get("eos_token_id"),
        "pad_token_id": text.get("pad_token_id"), **rope,
    }
    if layout == "specforge":
        arch = architecture or "LlamaForCausalLMEagle3"
        if arch not in SPECFORGE_ARCHITECTURES:
            raise ValueError(f"{arch!r} is not a SpecForge/vLLM EAGLE-3 architecture {SPECFORGE_ARCHITECTURES}")
        config = {"architectures": [arch], "model_type": "llama", **layer_cfg, "draft_vocab_size": draft_vocab,
                  "torch_dtype": dtype_name, "use_cache": True, "pretraining_tp": 1}
        if target_model_type:
            config["target_model_type"] = target_model_type   # as SpecForge's qwen2-5-vl config writes
        if lower is not None:
            config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": lower, "use_aux_hidden_state": True}
        if top is not None:
            config["eagle_aux_hidden_state_layer_ids"] = top
        if norm_before_residual is not DEFAULT and norm_before_residual is not None:
            config["norm_before_residual"] = bool(norm_before_residual)
    else:
        arch = architecture or "Eagle3DraftModel"
        if arch not in SPECULATORS_ARCHITECTURES:
            raise ValueError(f"{arch!r} is not a speculators EAGLE-3 architecture {SPECULATORS_ARCHITECTURES}")
        config = {
            "architectures": [arch], "speculators_model_type": "eagle3", "speculators_version": "0.9.0",
            "speculators_config": {
                "algorithm": "eagle3",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1,
                                      "accept_tolerance": 0.0}],
                "default_proposal_method": "greedy",
                "verifier": {"name_or_path": target_name,
                             "architectures": list(text.get("architectures") or ["LlamaForCausalLM"])},
            },
            "transformer_layer_config": {"model_type": "llama", **layer_cfg, "torch_dtype": dtype_name},
            "draft_vocab_size": draft_vocab, "target_hidden_size": None, "norm_before_fc": False,
            "fc_norm": False, "norm_output": False, "embed_requires_grad": False, "torch_dtype": dtype_name,
        }
        if norm_before_residual is DEFAULT:
            config["norm_before_residual"] = False
        elif norm_before_residual is not None:
            config["norm_before_residual"] = bool(norm_before_residual)
        if top is not None:
            config["eagle_aux_hidden_state_layer_ids"] = top
        if lower is not None:
            config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": lower, "use_aux_hidden_state": True}
    if extra_config:
        config.update(dict(extra_config))

    from safetensors.torch import save_file

    save_file(tensors_out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# reading a head
# ----------------------------------------------------------------------------------------------------------------

def read_head(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, all tensors of every ``*.safetensors`` file in the folder)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            if name in tensors:
                raise ValueError(f"{name} appears in two files")
            tensors[name] = t
    return config, tensors


def load_reference(folder, dtype=torch.float32, target_lm_head=None) -> Eagle3Reference:
    """Read a head folder of either layout into ``Eagle3Reference`` (independent of mmspec)."""
    config, tensors = read_head(folder)
    detect_layout(config)
    return Eagle3Reference(tensors, config, dtype=dtype, target_lm_head=target_lm_head)


def canonical_tensors(folder) -> dict[str, torch.Tensor]:
    """The folder's tensors under the canonical names (``layer.*``), for bit-for-bit comparisons."""
    from tests.eagle3_reference import normalize_state_dict

    return normalize_state_dict(read_head(folder)[1])


__all__ = ["AUX_CONVENTIONS", "DEFAULT", "LAYER_TENSORS", "LAYOUTS", "canonical_tensors", "default_aux_ids",
           "load_reference", "random_head_tensors", "read_head", "target_text_config", "vocab_buffers",
           "vocab_selection", "write_head"]
