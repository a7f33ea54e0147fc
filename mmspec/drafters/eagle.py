"""``drafter_kind="eagle"``: a one-layer head that drafts from the target's own last hidden states (EAGLE, MSD).

At sequence position t the head takes the target's last hidden state h_t and the input of position t+1 (the
token's embedding, or for an image placeholder the image feature the target put there, through its own
projection: modality-decoupled, as MSD) and predicts h_{t+1}; the target's own LM head (frozen, shared, never
copied) turns the prediction into a distribution. Drafting k tokens feeds its own predictions back. The engine
hands the head the target's hidden states of every position it commits (``wants_hidden``), so after each round
the head re-reads the true features of the accepted tokens (its own guesses are dropped from its cache).

Optional: a trimmed LM head for drafting only (VocabTrim: the rows of the tokens the target actually emits),
and a confidence stop (a row's draft ends when the head's probability for its next token is below
``stop_threshold``: Draft & Verify / MCSD). Folders are made by ``mmspec train-drafter --kind eagle``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.drafters.base import Drafter, never_drafted
from mmspec.drafters.eagle_batch import EagleDraftBatch, rotate_half
from mmspec.errors import MMSpecError
from mmspec.targets.base import TargetAdapter


CONFIG_NAME = "eagle_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mmspec-eagle/1"


def layer_config(cfg: dict):
    from transformers import LlamaConfig

    cfg_ = LlamaConfig(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                       num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
                       head_dim=cfg["hidden_size"] // cfg["num_attention_heads"], num_hidden_layers=1,
                       rms_norm_eps=cfg["rms_norm_eps"], max_position_embeddings=cfg["max_position_embeddings"],
                       vocab_size=cfg["vocab_size"], rope_theta=cfg.get("rope_theta", 10000.0))
    cfg_._attn_implementation = "sdpa"
    return cfg_


def head_config_for(adapter: TargetAdapter, intermediate_size: int | None = None) -> dict:
    """The head's shape for a target: the target's hidden size, heads and vocabulary; one layer."""
    text = adapter.model.config.get_text_config()
    heads = int(text.num_attention_heads)
    return {"format": FORMAT, "family": adapter.family, "model_type": adapter.model.config.model_type,
            "target": str(adapter.model.config._name_or_path), "hidden_size": int(text.hidden_size),
            "intermediate_size": int(intermediate_size or text.intermediate_size), "num_attention_heads": heads,
            "num_key_value_heads": int(getattr(text, "num_key_value_heads", heads) or heads),
            "rms_norm_eps": float(getattr(text, "rms_norm_eps", 1e-6)),
            "max_position_embeddings": int(adapter.context_length if adapter.context_length < 1 << 20 else 32768),
            "vocab_size": int(adapter.vocab_size), "draft_vocab": None, "stop_threshold": 0.0,
            "acceptance": None}


class EagleHead(nn.Module):
    """fc(cat(input, hidden)) -> one Llama decoder layer -> predicted next hidden state."""

    def __init__(self, cfg: dict):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.cfg = dict(cfg)
        self.drafting = None     # fused weights, set by ``freeze_for_drafting``
        H = cfg["hidden_size"]
        self.layer_cfg = layer_config(cfg)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.image_proj = nn.Linear(H, H, bias=False)   # image positions: the target's image features, projected
        self.layer = LlamaDecoderLayer(self.layer_cfg, 0)
        self.rotary = LlamaRotaryEmbedding(self.layer_cfg)
        with torch.no_grad():
            self.image_proj.weight.copy_(torch.eye(H))
            # start as "input + hidden": the layer then learns the step from h_t to h_{t+1}
            self.fc.weight.zero_()
            self.fc.weight[:, :H] += torch.eye(H) * 0.5
            self.fc.weight[:, H:] += torch.eye(H) * 0.5

    def inputs(self, token_embeds: torch.Tensor, image_feats: torch.Tensor | None, is_image: torch.Tensor | None):
        """The per-position input: token embeddings, or projected image features at image positions."""
        if image_feats is None or is_image is None or not bool(is_image.any()):
            return token_embeds
        return torch.where(is_image[..., None], self.image_proj(image_feats.to(token_embeds.dtype)), token_embeds)

    def forward(self, hidden: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None,
                positions: torch.Tensor, cache=None) -> torch.Tensor:
        """hidden, inputs [B, T, H] -> predicted next hidden states [B, T, H]. ``mask``: 4-D additive, or None
        when every new token may see every cached slot (one token on a dense cache).

        The decoder layer's own computation (same modules, same order of operations as ``LlamaDecoderLayer``
        with sdpa; checked against it in the tests) without its keyword plumbing: a drafting step runs this
        once per drafted token, and on a small head the plumbing cost as much as the arithmetic."""
        x = self.fc(torch.cat([inputs.to(self.fc.weight.dtype), hidden.to(self.fc.weight.dtype)], dim=-1))
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        layer = self.layer
        attn = layer.self_attn
        B, T, _ = x.shape
        h = layer.input_layernorm(x)
        if self.drafting is not None:   # fused projections (frozen weights): fewer ops per drafted token
            qkv, gate_up = self.drafting
            q, k, v = F.linear(h, qkv).split(self._qkv_sizes, dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q, k, v = (t.view(B, T, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, 0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                           enable_gqa=k.shape[1] != q.shape[1])
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        h = layer.post_attention_layernorm(x)
        if self.drafting is not None:
            gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
            return x + layer.mlp.down_proj(F.silu(gate) * up)
        return x + layer.mlp(h)

    def freeze_for_drafting(self) -> "EagleHead":
        """Inference only from here on: q/k/v and gate/up projections fused into one matmul each (same
        numbers, fewer ops per drafted token). Training heads never call this."""
        attn, mlp = self.layer.self_attn, self.layer.mlp
        with torch.no_grad():
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        self._qkv_sizes = [attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0]]
        self.drafting = (qkv, gate_up)
        return self

    # ----- files ----------------------------------------------------------------------------------
    def save_pretrained(self, folder, dtype: torch.dtype = torch.float32) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()
                 if not k.startswith("rotary.")}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
        (folder / CONFIG_NAME).write_text(json.dumps(self.cfg, indent=2) + "\n")

    @classmethod
    def exists(cls, folder) -> bool:
        return (Path(str(folder)) / CONFIG_NAME).is_file()

    @classmethod
    def from_pretrained(cls, folder) -> "EagleHead":
        from safetensors.torch import load_file

        folder = Path(str(folder))
        if not cls.exists(folder):
            raise MMSpecError(f"{folder} is not an eagle drafter (no {CONFIG_NAME}); make one with "
                              "`mmspec train-drafter --kind eagle`")
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        if cfg.get("format") != FORMAT:
            raise MMSpecError(f"{folder / CONFIG_NAME} is not an mmspec eagle head config ({FORMAT})")
        head = cls(cfg)
        state = load_file(str(folder / WEIGHTS_NAME))
        missing, unexpected = head.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.startswith("rotary.")]
        if missing or unexpected:
            raise MMSpecError(f"{folder}: eagle weights do not match its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
        return head


def record_acceptance(folder, rate: float) -> None:
    """Write a head's measured held-out acceptance into its config (the draft-length policy's prior): mmspec's
    first format's ``eagle_config.json``, else an EAGLE-3 head's ``config.json`` (engines ignore the key)."""
    path = Path(str(folder)) / CONFIG_NAME
    if not path.is_file():
        path = Path(str(folder)) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["acceptance"] = round(float(rate), 3)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def check_head_fits(cfg: dict, adapter: TargetAdapter, where) -> None:
    """A head trained for another target is refused: hidden size, vocabulary and family must be the target's."""
    text = adapter.model.config.get_text_config()
    problems = []
    if cfg["hidden_size"] != text.hidden_size:
        problems.append(f"hidden size {cfg['hidden_size']} vs the target's {text.hidden_size}")
    if cfg["vocab_size"] != adapter.vocab_size:
        problems.append(f"vocabulary {cfg['vocab_size']} vs the target's {adapter.vocab_size}")
    if cfg.get("family") != adapter.family:
        problems.append(f"family {cfg.get('family')!r} vs the target's {adapter.family!r}")
    if problems:
        raise MMSpecError(f"the eagle drafter in {where} was trained for another target ({'; '.join(problems)}); "
                          "train one for this target with `mmspec train-drafter --kind eagle --target ...`")


class EagleDrafter(Drafter):
    kind = "eagle"
    default_k = 4
    needs_weights = True
    grows_trees = True
    default_tree_nodes = 32

    def __init__(self, target: TargetAdapter, head: EagleHead, where="the given head"):
        super().__init__(target)
        check_head_fits(head.cfg, target, where)
        self.head = head.to(target.device, target.model.dtype).eval().freeze_for_drafting()
        self.model = self.head
        self.lm_head = target.model.get_output_embeddings()
        self.embed = target.model.get_input_embeddings()
        vocab = head.cfg.get("draft_vocab")
        self.draft_vocab = None if vocab is None else torch.tensor(vocab, dtype=torch.long, device=target.device)
        # VocabTrim: the rows of the tokens drafting may propose (a drafting-only slice; verification is unchanged)
        self.trimmed_weight = None if vocab is None else self.lm_head.weight.detach()[self.draft_vocab]
        self.stop_threshold = float(head.cfg.get("stop_threshold") or 0.0)
        # the held-out acceptance train-drafter measured for this head: the first requests draft as long as
        # it earned instead of starting from a generic guess
        self.prior_acceptance = float(head.cfg.get("acceptance") or Drafter.prior_acceptance)
        self.bad_ids = never_drafted(target)

    @classmethod
    def from_pretrained(cls, target: TargetAdapter, path, dtype, trust_remote_code: bool = False) -> Drafter:
        """mmspec's own head (``eagle_config.json``, the first format), or an EAGLE-3 head in either published
        layout (``config.json``: ``mmspec.drafters.eagle3``)."""
        if EagleHead.exists(path):
            return cls(target, EagleHead.from_pretrained(path), where=str(path))
        from mmspec.drafters.eagle3 import Eagle3Drafter, read_config

        if read_config(path) is not None:
            return Eagle3Drafter.from_pretrained(target, path, dtype, trust_remote_code)
        raise MMSpecError(f"{path} is not an eagle drafter folder (neither an EAGLE-3 head's config.json nor "
                          f"mmspec's {CONFIG_NAME}); make one with `mmspec train-drafter --kind eagle`")

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """[..., H] predicted hidden states -> [..., vocab] float32 logits over the target's vocabulary."""
        if self.trimmed_weight is None:
            return self.lm_head(f).float().masked_fill(self.bad_ids, float("-inf"))
        small = torch.nn.functional.linear(f, self.trimmed_weight).float()
        full = torch.full(f.shape[:-1] + (self.target.vocab_size,), float("-inf"), device=f.device)
        full[..., self.draft_vocab] = small
        return full.masked_fill(self.bad_ids, float("-inf"))

    def batch(self) -> "EagleDraftBatch":
        return EagleDraftBatch(self)


__all__ = ["EagleDrafter", "EagleHead", "check_head_fits", "head_config_for", "record_acceptance"]
