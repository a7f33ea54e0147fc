"""``drafter_kind="layerskip"``: the target drafts for itself with some of its decoder layers skipped (Draft & Verify,
Zhang et al. 2024): zero extra weights, one model in memory, for every family whose decoder is a list of layers.

The drafter is a *view* of the target's own decoder (``skip_view``): the same module objects and weights, its layer
list without the skipped ones, run through the decoder's own ``forward`` (so each family's positions, M-RoPE
included, and its final norm are its own); the target's LM head turns the last hidden states into logits. The
target itself is never touched, so the target and its drafter can run in any order on any thread.

**Cache.** The drafter keeps its own KV cache (a ``SlotCache`` whose skipped layers stay empty), not the target's:
at a layer after a skipped one the drafter's inputs differ from the target's, so the target's entries are not the
drafter's (sharing them would make another drafter, not the same one exactly); they agree only below the first
skipped layer, and the target's cache lives in the engine's ``TargetBatch``, which a drafter never sees. Cost: the
drafter's prefill runs the prompt through its kept layers once per request.

**Image.** The drafter's prompt is the target's own prompt embeddings (``adapter.prompt_embeds``: the request's
image features, computed once through the vision cache, at the placeholders): nothing is encoded twice. Extra
prefill inputs some families add at given layer indices (Qwen3-VL's DeepStack) are left out: they would land on
the wrong layers of a shortened stack; the drafter is then a little weaker, never wrong.

**Which layers.** ``drafter=`` a skip-set file written by ``mmspec tune-layerskip`` (``FORMAT``; refused with a
clear error when it names layers the target lacks or was tuned for another target), a list of layer ids, or
``"untuned"`` (every other middle layer, ``default_skip``). Without one, the bundled target's shipped tuned set
(``assets/models/layerskip.json``) where it fits the target, else the untuned default.

**Adaptive draft stop** (Draft & Verify's adaptive draft-exiting): a chain ends where the drafter's probability for
its token falls below a threshold that follows the batch's acceptance (``AdaptiveStop``), beside the cost-based
draft length (``mmspec.policy``), which still caps k. Seeded sampling rows draft without it (their sample must
not depend on what other requests accepted). Trees use the tree's probability floor instead.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from mmspec.drafters.base import Drafter, RowSpec, never_drafted
from mmspec.drafters.model_batch import FedTokens, ModelDraftBatch
from mmspec.errors import MMSpecError
from mmspec.kv import CACHE_KW, SlotCache
from mmspec.loading import ASSETS
from mmspec.targets.base import TargetAdapter

FORMAT = "mmspec-layerskip/1"
BUNDLED_SKIP_SET = ASSETS / "models" / "layerskip.json"
UNTUNED = "untuned"


# ----- the decoder and its layers ----------------------------------------------------------------------------
def decoder_layers(model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The target's decoder and its layer list; a family whose layers cannot be skipped is refused."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) < 2:
        raise MMSpecError(f"drafter_kind='layerskip' needs a decoder with a list of at least two layers; "
                          f"{type(decoder).__name__} has none", code="invalid_value", param="drafter_kind")
    types = set(getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"])
    if types - {"full_attention"}:
        # a linear-attention or sliding layer keeps state the slot cache cannot roll back or mask
        raise MMSpecError(f"drafter_kind='layerskip' skips full-attention layers only; this target has "
                          f"{sorted(types - {'full_attention'})} layers", code="invalid_value", param="drafter_kind")
    return decoder, layers


def skip_view(decoder: torch.nn.Module, skip) -> torch.nn.Module:
    """A shallow copy of ``decoder`` whose layer list lacks ``skip``: the same layer objects and weights (each keeps
    its ``layer_idx``, so the cache entries of the layers it runs are where the full stack's would be)."""
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)
    view._modules["layers"] = torch.nn.ModuleList([m for i, m in enumerate(decoder.layers) if i not in set(skip)])
    return view


def default_skip(n_layers: int) -> list[int]:
    """The untuned skip set: every other middle layer (odd ids, first and last layers kept); one layer of two."""
    if n_layers < 2:
        raise MMSpecError("drafter_kind='layerskip' needs at least two decoder layers")
    return [i for i in range(1, n_layers - 1, 2)] or [n_layers - 1]


# ----- skip-set files ----------------------------------------------------------------------------------------
def identity(model) -> dict:
    """What a skip set was tuned for: the decoder's shape and a fingerprint of its weights (each layer's first
    matrix's norm, six digits: the same checkpoint in another dtype agrees to ~1e-3, another one does not)."""
    text = model.config.get_text_config()
    _, layers = decoder_layers(model)
    prints = []
    with torch.no_grad():
        for layer in layers:
            w = next((p for p in layer.parameters() if p.dim() == 2), None)
            prints.append(0.0 if w is None else float(f"{float(w.detach().double().norm()):.6g}"))
    return {"model_type": str(model.config.model_type), "name": str(getattr(model.config, "_name_or_path", "")),
            "num_hidden_layers": len(layers), "hidden_size": int(text.hidden_size),
            "vocab_size": int(model.get_output_embeddings().weight.shape[0]), "fingerprint": prints}


def check_skip(skip, n_layers: int, where: str) -> list[int]:
    """``skip`` as sorted layer ids, refused unless each is an id of the target's ``n_layers`` and one is kept."""
    if not isinstance(skip, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in skip):
        raise MMSpecError(f"{where}: the skip set must be a list of layer ids (integers), got {skip!r}",
                          code="invalid_value", param="drafter")
    bad = sorted({i for i in skip if not 0 <= i < n_layers})
    if bad:
        raise MMSpecError(f"{where}: layer ids {bad} are out of range: the target has {n_layers} decoder layers "
                          f"(0..{n_layers - 1})", code="invalid_value", param="drafter")
    skip = sorted(set(skip))
    if len(skip) >= n_layers:
        raise MMSpecError(f"{where}: the skip set skips every layer; keep at least one", code="invalid_value",
                          param="drafter")
    return skip


def fits(settings: dict, target_identity: dict) -> str | None:
    """None when a skip-set file's target is this target, else why not."""
    want = settings.get("target") or {}
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
        if want.get(key) != target_identity[key]:
            return f"{key} {want.get(key)!r} vs the target's {target_identity[key]!r}"
    a, b = want.get("fingerprint") or [], target_identity["fingerprint"]
    if len(a) != len(b) or any(not math.isclose(x, y, rel_tol=1e-2, abs_tol=1e-6) for x, y in zip(a, b)):
        return "its weights' fingerprint differs (another checkpoint of the same shape)"
    return None


def read_skip_file(path) -> dict:
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise MMSpecError(f"drafter_kind='layerskip' takes a skip-set file (made by `mmspec tune-layerskip`), a list "
                          f"of layer ids or {UNTUNED!r}; {str(path)!r} is not a file", code="invalid_value",
                          param="drafter")
    try:
        settings = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise MMSpecError(f"{path} is not a layerskip skip-set file (not JSON: {e})", code="invalid_value",
                          param="drafter") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT or "skip" not in settings:
        raise MMSpecError(f"{path} is not a layerskip skip-set file (no format {FORMAT!r} and skip list)",
                          code="invalid_value", param="drafter")
    return settings


def write_skip_file(path, model, skip: list[int], **extra) -> dict:
    settings = {"format": FORMAT, "skip": sorted(skip), "target": identity(model), **extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(settings, indent=2) + "\n")
    return settings


def resolve_skip(model, drafter) -> tuple[list[int], dict, str]:
    """(skip set, its file's settings or {}, where it came from) for ``drafter=`` (module docstring)."""
    n = len(decoder_layers(model)[1])
    if drafter is None or str(drafter) == "default":
        if BUNDLED_SKIP_SET.is_file():
            settings = read_skip_file(BUNDLED_SKIP_SET)
            if fits(settings, identity(model)) is None:
                return check_skip(settings["skip"], n, str(BUNDLED_SKIP_SET)), settings, str(BUNDLED_SKIP_SET)
        return default_skip(n), {}, UNTUNED
    if isinstance(drafter, (list, tuple)):
        return check_skip(list(drafter), n, "the skip set"), {}, "given"
    if str(drafter) == UNTUNED:
        return default_skip(n), {}, UNTUNED
    settings = read_skip_file(drafter)
    why = fits(settings, identity(model))
    if why is not None:
        raise MMSpecError(f"{drafter} was tuned for another target ({why}); tune one for this target with "
                          "`mmspec tune-layerskip --target ... --out FILE`", code="invalid_value", param="drafter")
    return check_skip(settings["skip"], n, str(drafter)), settings, str(drafter)


# ----- the adaptive stop -------------------------------------------------------------------------------------
class AdaptiveStop:
    """Draft & Verify's adaptive draft-exiting threshold: after each round the acceptance rate of what was drafted
    is smoothed (``beta1``); the threshold steps up by ``eps`` when it is below ``target`` (drafts stop sooner) and
    down otherwise (they run longer), smoothed again (``beta2``), within [lo, hi]."""

    def __init__(self, start: float, target: float = 0.8, eps: float = 0.05, beta1: float = 0.5, beta2: float = 0.5,
                 lo: float = 0.05, hi: float = 0.95):
        self.value, self.target, self.eps, self.beta1, self.beta2 = start, target, eps, beta1, beta2
        self.lo, self.hi = lo, hi
        self.rate = target

    def observe(self, accepted: int, drafted: int) -> None:
        if drafted <= 0:
            return
        self.rate = self.beta1 * self.rate + (1 - self.beta1) * accepted / drafted
        stepped = self.value + (self.eps if self.rate < self.target else -self.eps)
        self.value = min(max(self.beta2 * self.value + (1 - self.beta2) * stepped, self.lo), self.hi)


# ----- the drafter -------------------------------------------------------------------------------------------
class LayerSkipDrafter(Drafter):
    kind = "layerskip"
    default_k = 4
    grows_trees = True
    takes_settings = True     # ``drafter=`` names its skip set (a file, ids, "untuned"), not weights
    default_tree_nodes = 16
    bench_variants = {UNTUNED: UNTUNED}   # ``mmspec bench --modes mmspec-layerskip-untuned``: the default set
    start_threshold = 0.5     # the adaptive stop's first value when the skip-set file does not give one

    def __init__(self, target: TargetAdapter, drafter=None):
        super().__init__(target)
        model = target.model
        self.decoder, layers = decoder_layers(model)
        self.n_layers = len(layers)
        self.skip, self.settings, self.source = resolve_skip(model, drafter)
        self.view = skip_view(self.decoder, self.skip)
        self.head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self.context_length = target.context_length
        self.start_threshold = float(self.settings.get("stop_threshold") or self.start_threshold)
        # the acceptance the tuning measured: the draft-length policy starts from it
        self.prior_acceptance = float(self.settings.get("acceptance") or Drafter.prior_acceptance)
        self.bad_ids = never_drafted(target)

    @property
    def kept_fraction(self) -> float:
        """The share of the decoder a draft forward runs (what a draft step costs where time grows with layers)."""
        return (self.n_layers - len(self.skip)) / self.n_layers

    def readable(self, ids: list[int]) -> list[int]:
        return ids

    def batch(self) -> "LayerSkipDraftBatch":
        return LayerSkipDraftBatch(self)


class LayerSkipDraftBatch(ModelDraftBatch):
    """Rows drafting through the skip view over one cache of the kept layers; a row's sequence is the target's."""

    def __init__(self, drafter: LayerSkipDrafter):
        target = drafter.target
        slots = SlotCache(target.model.config.get_text_config(), drafter.embed.weight.device,
                          drafter.embed.weight.dtype)
        super().__init__(drafter, slots)
        self.positions: dict = {}      # row -> the adapter's ``Positions``
        self.stop = AdaptiveStop(drafter.start_threshold)
        self.drafted: dict = {}        # row -> tokens drafted this round (chains under the adaptive stop)

    def _open(self, row, spec: RowSpec) -> FedTokens:
        adapter = self.drafter.target
        embeds = adapter.prompt_embeds(spec.request)[0]        # [L, hidden]: the request's features, spliced
        self.positions[row] = adapter.positions(spec.request)
        return FedTokens([], embeds.shape[0], embeds)

    def remove(self, rows) -> None:
        super().remove(rows)
        for r in rows:
            self.positions.pop(r, None)
            self.drafted.pop(r, None)

    def _inputs(self, ids: torch.Tensor, prev) -> torch.Tensor:
        return self.drafter.embed(ids)

    def _model(self, slots: SlotCache, x: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        mask, logical = slots.extend(parents, **tree)
        pos = torch.stack([self.positions[r](logical[b]) for b, r in enumerate(slots.rows)], dim=1)  # [P, B, T]
        pos = pos[0] if pos.shape[0] == 1 else pos
        out = self.drafter.view(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True,
                                **{CACHE_KW: slots.cache})
        return out.last_hidden_state

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.drafter.head(out).float().masked_fill(self.bad, float("-inf"))

    def propose(self, ks: dict, tree_nodes: dict | None = None) -> dict:
        seeded = any(k and not self.specs[r].config.greedy and self.specs[r].config.seed is not None
                     for r, k in ks.items())
        self.stop_threshold = 0.0 if seeded else self.stop.value
        out = super().propose(ks, tree_nodes)
        self.drafted = {} if tree_nodes else {r: len(d) for r, d in out.items() if len(d)}
        return out

    def update(self, results: dict, hidden: dict | None = None) -> None:
        accepted = sum(min(results[r][0], n) for r, n in self.drafted.items() if r in results)
        self.stop.observe(accepted, sum(n for r, n in self.drafted.items() if r in results))
        self.drafted = {}
        super().update(results, hidden)


__all__ = ["AdaptiveStop", "BUNDLED_SKIP_SET", "FORMAT", "LayerSkipDrafter", "check_skip", "default_skip",
           "identity", "read_skip_file", "resolve_skip", "skip_view", "write_skip_file"]
