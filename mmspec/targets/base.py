"""The target-adapter interface: everything the loop needs from a VLM family, and nothing about drafting.

An adapter turns (image, prompt) into a ``Request`` (token ids, pixel inputs, image key), computes the image
features through the shared ``vision`` cache, and gives the prompt's embeddings and positions; ``TargetBatch``
runs any number of such requests through the model's own decoder in one forward per round. Families with
variable image-token counts or their own position scheme override ``prepare``/``positions``.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmspec.errors import MMSpecError
from mmspec.kv import CACHE_KW, SlotCache, chain
from vision.cache import EmbeddingCache, image_digest


@dataclass
class Request:
    """One prepared request. ``prompt_ids`` holds the image placeholders the target expects."""

    prompt_ids: list[int]
    image: Image.Image
    image_key: str
    model_inputs: dict[str, Any]          # processor output (pixel_values, image_sizes, ...), on CPU
    image_token_ids: frozenset[int]
    prompt_text: str = ""                 # the formatted prompt the ids came from (a drafter VLM re-processes it)
    token_types: Any = None               # [1, L] 0 text / 1 image, for families whose positions need them
    features: Any = None                  # filled by ``TargetAdapter.image_features``
    vision_cache_hit: bool = False

    @property
    def text_only_ids(self) -> list[int]:
        """The prompt as a text-only drafter sees it: every image placeholder removed."""
        return [t for t in self.prompt_ids if t not in self.image_token_ids]


class Positions:
    """Maps a row's logical positions [n] to what the model takes: [1, n] (1-D families) or [4, n] (M-RoPE)."""

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return p[None]


class TargetBatch:
    """The target's side of a batch of requests: one KV cache of slots (``mmspec.kv.SlotCache``), each row with
    its own length and positions. Rows join with ``add`` and leave with ``remove`` at any round.

    ``verify`` runs ONE forward of every row's new tokens (the pending token then its drafts, a chain or a tree
    given by parents) and returns their logits, plus the last hidden states when ``want_hidden``; ``commit``
    keeps what was accepted. A row's prefill waits for its first ``verify``: it runs in that same call (alone,
    so it costs the running rows nothing), with the prompt's last position as the pending token.
    """

    def __init__(self, adapter: "TargetAdapter", want_hidden: bool = False):
        model = adapter.model
        self.adapter = adapter
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.config = model.config.get_text_config()
        self.want_hidden = want_hidden
        self.main = self._slots()
        self.positions: dict = {}        # row -> Positions
        self.fresh: dict = {}            # row -> (embeds of the positions before the pending one, pending's embed)
        self.prefilled: list = []        # SlotCaches of prefills not yet merged into ``main``
        self.hidden: dict = {}           # row -> [n, hidden] of the last verify, when ``want_hidden``
        self.committed_hidden: dict = {}

    def _slots(self):
        slots = SlotCache(self.config, self.device, self.dtype)
        slots.none_means = "causal"   # transformers' decoder
        return slots

    def length(self, row) -> int:
        """Positions in the row's cache, the pending one excluded (before the prefill: the prompt but its last)."""
        if row in self.fresh:
            return self.fresh[row][0].shape[1]
        return self.main.length(row)

    def add(self, row, request: Request) -> None:
        embeds = self.adapter.prompt_embeds(request)            # [1, L, hidden]
        self.fresh[row] = (embeds[:, :-1], embeds[:, -1:])
        self.positions[row] = self.adapter.positions(request)

    def remove(self, rows) -> None:
        for r in rows:
            self.fresh.pop(r, None)
            self.positions.pop(r, None)
            self.hidden.pop(r, None)
        self.main.remove(rows)

    def _forward(self, slots, embeds: torch.Tensor, parents: list[list[int]], rows: list, **tree) -> tuple:
        """embeds [B, T, hidden] of ``rows`` (the order of ``slots.rows``) -> logits [B, T, vocab], hidden.
        ``tree``: ``SlotCache.extend``'s keywords for nodes grown over several forwards (``forward_nodes``)."""
        mask, logical = slots.extend(parents, **tree)
        pos = torch.stack([self.positions[r](logical[b]) for b, r in enumerate(rows)], dim=1)  # [P, B, T]
        pos = pos[0] if pos.shape[0] == 1 else pos
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                           **{CACHE_KW: slots.cache})
        hidden = out.last_hidden_state
        return self.head(hidden).float(), hidden

    def verify(self, ids: dict, parents: dict | None = None) -> dict:
        """ids: row -> [n] (the pending token then the drafts); parents: row -> n parent indices (``-1`` for
        the pending token; default a chain). Returns row -> logits [n, vocab] (float32); row i predicts the
        token after node i."""
        parents = parents or {}
        out = {}
        joining = [r for r in ids if r in self.fresh]
        if joining:
            # the joining rows' prefills run together, apart from the running rows (whose rounds are short)
            slots = self._slots()
            for r in joining:
                slots.add_empty(r)
            embeds, full, starts = [], [], []
            for r in joining:
                prompt, first = self.fresh.pop(r)
                new = ids[r].to(self.device)
                emb = self.embed(new[None])
                if first is not None:
                    emb = torch.cat([first.to(emb.dtype), emb[:, 1:]], dim=1)
                embeds.append(torch.cat([prompt.to(emb.dtype), emb], dim=1)[0])
                L = prompt.shape[1]
                par = parents.get(r) or chain(len(new))
                full.append(chain(L) + [p + L if p >= 0 else L - 1 for p in par])
                starts.append(L)
            T = max(e.shape[0] for e in embeds)
            batch = torch.zeros(len(joining), T, embeds[0].shape[-1], dtype=embeds[0].dtype, device=self.device)
            for b, e in enumerate(embeds):
                batch[b, : e.shape[0]] = e
            logits, hidden = self._forward(slots, batch, full, joining)
            slots.prefix = starts   # the prompts' slots are kept whatever is accepted
            self.prefilled.append(slots)
            for b, r in enumerate(joining):
                n = int(ids[r].shape[0])
                out[r] = logits[b, starts[b]: starts[b] + n]
                if self.want_hidden:   # the prompt's positions too: they are committed with this round
                    self.hidden[r] = hidden[b, : starts[b] + n]
        rows = self.main.rows
        counts = [int(ids[r].shape[0]) if r in ids else 0 for r in rows]
        T = max(counts, default=0)
        if T:
            # rows not given (or given nothing) take part as padding: their caches only grow holes
            pad = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
            for b, r in enumerate(rows):
                if counts[b]:
                    pad[b, :counts[b]] = ids[r].to(self.device)
            logits, hidden = self._forward(self.main, self.embed(pad),
                                           [(parents.get(r) or chain(n)) if n else [] for r, n in zip(rows, counts)],
                                           rows)
            for b, r in enumerate(rows):
                if r in ids:
                    out[r] = logits[b, :counts[b]]
                    if self.want_hidden:
                        self.hidden[r] = hidden[b, :counts[b]]
        else:
            for r in rows:
                if r in ids:
                    out[r] = torch.empty(0, self.head.weight.shape[0], device=self.device)
        return out

    def forward_nodes(self, ids: torch.Tensor, parents: list[list[int]], **tree) -> torch.Tensor:
        """One forward of the running rows' tokens that commits nothing: a drafter VLM growing a tree feeds its
        nodes depth by depth this way. ids [B, T] in the order of ``main.rows`` (rows feeding nothing pad);
        ``parents`` and ``tree`` are ``SlotCache.extend``'s arguments (``TreeFeeds.extend_args``: each node sees
        the row's committed slots and its own fed ancestors, at position length + depth, mapped by the row's
        ``Positions``; its slot stays hidden and the next ``tidy`` crops it). -> logits [B, T, vocab] (float32)."""
        return self._forward(self.main, self.embed(ids), parents, self.main.rows, **tree)[0]

    def tidy(self) -> None:
        """Crop slots no row uses (a tree's hidden nodes after ``forward_nodes``)."""
        self.main.tidy()

    def commit(self, keep: dict) -> None:
        """keep: row -> indices (into the row's last verified tokens, root first) that stay in the cache.
        With ``want_hidden``, ``committed_hidden[row]`` is then the last hidden states of the positions this
        commit added, in order (for a row's first round: its whole prompt, then what was kept)."""
        if self.want_hidden:
            self.committed_hidden = {}
            starts = {r: L for slots in self.prefilled for r, L in zip(slots.rows, slots.prefix)}
            for r, idx in keep.items():
                h = self.hidden.get(r)
                if h is None:
                    continue
                L = starts.get(r, 0)
                sel = torch.tensor([L + i for i in idx], dtype=torch.long, device=h.device)
                self.committed_hidden[r] = torch.cat([h[:L], h.index_select(0, sel)])
        if self.main.rows:
            self.main.commit([list(keep.get(r, ())) for r in self.main.rows])
        for slots in self.prefilled:
            slots.commit([list(range(L)) + [L + i for i in keep[r]] for r, L in zip(slots.rows, slots.prefix)])
            self.main.absorb(slots)
        self.prefilled = []

    def truncate(self, row, length: int) -> None:
        """Forget every position of ``row`` from ``length`` on (the next verify re-feeds from there)."""
        if row in self.fresh:
            prompt, first = self.fresh[row]
            if length < prompt.shape[1]:
                self.fresh[row] = (prompt[:, :length], None)
            return
        self.main.truncate(row, length)


class TargetSession:
    """One request on its own: ``forward(ids)`` appends positions and returns their logits [n, vocab],
    ``rollback(length)`` moves the cache back. A view of a one-row ``TargetBatch``, for tools and tests."""

    def __init__(self, adapter: "TargetAdapter", request: Request):
        self.batch = TargetBatch(adapter)
        self.batch.add(0, request)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.batch.verify({0: ids})[0]
        self.batch.commit({0: range(int(ids.shape[0]))})
        return logits

    def rollback(self, length: int) -> None:
        self.batch.truncate(0, length)

    @property
    def length(self) -> int:
        return self.batch.length(0)


class TargetAdapter(ABC):
    """Base class of one VLM family. Subclasses set ``family`` and list the HF classes they accept."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, model, processor, vision_cache: EmbeddingCache):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.vision_cache = vision_cache
        # Cache keys carry this adapter's identity: the same pixels through another model are another entry.
        self.cache_namespace = f"{type(model).__name__}:{model.config._name_or_path}:{uuid.uuid4().hex[:8]}"
        self.device = model.get_input_embeddings().weight.device

    @classmethod
    def accepts(cls, model) -> bool:
        return getattr(model.config, "model_type", None) in cls.model_types

    # ----- prompt ---------------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        """One user turn with the image then the text, generation prompt added, as the model cards do.

        A prompt that already holds the processor's image token (``"<image>\nWhat is this?"``, as model cards
        write prompts) is honoured: the image goes where the token is, rendered the way the chat template renders
        an image, and no second image is added. More than one image token is refused (one image per request).
        """
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise MMSpecError("this target's processor has no chat template; pass raw_prompt=True with a prompt "
                              "that already holds the image token(s)")
        image_token = getattr(self.processor, "image_token", None)
        n = prompt.count(image_token) if isinstance(image_token, str) and image_token else 0
        if n > 1:
            raise MMSpecError(f"the prompt holds the image token {image_token!r} {n} times, but a request has one "
                              f"image; keep one (it marks where the image goes) or none (the image comes first)")
        if n == 1:
            before, after = (part.strip() for part in prompt.split(image_token))
            content = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}] \
                + ([{"type": "text", "text": after}] if after else [])
        else:
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @property
    @abstractmethod
    def image_token_ids(self) -> frozenset[int]:
        """Placeholder ids that stand for image features in the prompt (never drafted)."""

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def context_length(self) -> int:
        cfg = self.model.config.get_text_config()
        return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return frozenset()
        return frozenset([ids] if isinstance(ids, int) else ids)

    # generation_config settings that change greedy ``generate()`` output and that the loop does not reproduce
    UNSUPPORTED_GENERATION_SETTINGS = {"no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
                                       "min_new_tokens": None, "suppress_tokens": None,
                                       "begin_suppress_tokens": None, "forced_bos_token_id": None,
                                       "forced_eos_token_id": None, "sequence_bias": None,
                                       "exponential_decay_length_penalty": None, "num_beams": 1,
                                       "num_beam_groups": 1, "penalty_alpha": None}

    @property
    def repetition_penalty(self) -> float:
        """Applied by the loop exactly as ``generate()`` applies it (e.g. Qwen2.5-VL ships 1.05)."""
        return float(getattr(self.model.generation_config, "repetition_penalty", None) or 1.0)

    def check_generation_config(self) -> None:
        text = self.model.config.get_text_config()
        if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
            # the engine hands every layer one explicit mask (holes, trees); a sliding window needs its own
            raise MMSpecError("this target uses sliding-window attention layers, which mmspec's batched and tree "
                              "masks do not model yet; its output could differ from generate()")
        cfg = self.model.generation_config
        for name, default in self.UNSUPPORTED_GENERATION_SETTINGS.items():
            value = getattr(cfg, name, default)
            if value not in (default, None, 0, [], ()):
                raise MMSpecError(f"the target's generation_config sets {name}={value!r}, which mmspec does not "
                                  f"apply yet, so its output would differ from generate(); reset it with "
                                  f"pipe.target.generation_config.{name} = {default!r} if that is what you want")

    @abstractmethod
    def prepare(self, image: Image.Image, prompt_text: str) -> Request:
        """Run the processor: token ids with image placeholders expanded, and pixel inputs."""

    @abstractmethod
    def encode_image(self, request: Request) -> Any:
        """The target's projected image features for ``request`` (what its placeholders are replaced by)."""

    def prompt_embeds(self, request: Request) -> torch.Tensor:
        """[1, prompt_len, hidden]: the prompt's token embeddings with the image features at the placeholders."""
        ids = torch.tensor([request.prompt_ids], device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        mask = torch.isin(ids, torch.tensor(sorted(self.feature_token_ids), device=self.device))
        n_slots, n_feats = int(mask.sum()), request.features.shape[0]
        if n_slots != n_feats:
            raise MMSpecError(f"the prompt has {n_slots} image placeholders but the image gives {n_feats} "
                              "features; use one image token per image in the prompt")
        return embeds.masked_scatter(mask[..., None], request.features.to(embeds.device, embeds.dtype))

    @property
    def feature_token_ids(self) -> frozenset[int]:
        """The placeholders the image features replace (Qwen-VL's video token is not one of them here)."""
        return self.image_token_ids

    def positions(self, request: Request) -> Positions:
        """How the row's logical positions map to the model's position ids (1-D unless overridden)."""
        return Positions()

    def session(self, request: Request) -> TargetSession:
        """One request on its own (``forward``/``rollback``); the engine uses ``TargetBatch`` directly."""
        return TargetSession(self, request)

    # ----- shared ---------------------------------------------------------------------------------
    def image_key(self, image: Image.Image) -> str:
        return f"{self.cache_namespace}/{image_digest(image)}"

    def image_features(self, request: Request) -> None:
        """Fill ``request.features`` from the vision cache, encoding the image only on a miss."""
        request.features, request.vision_cache_hit = self.vision_cache.get_or_compute(
            request.image_key, lambda: self.encode_image(request))

    def images_features(self, requests: list[Request]) -> None:
        """``image_features`` for several requests; families that can encode a stack of images at once
        (``encode_images``) run the misses in one vision forward."""
        misses = []
        for req in requests:
            value = self.vision_cache.get(req.image_key)
            if value is not None:
                self.vision_cache.hits += 1
                req.features, req.vision_cache_hit = value, True
            else:
                misses.append(req)
        if len(misses) > 1:
            encoded = self.encode_images(misses)
            if encoded is not None:
                for req, feats in zip(misses, encoded):
                    self.vision_cache.misses += 1
                    self.vision_cache.put(req.image_key, feats)
                    req.features, req.vision_cache_hit = feats, False
                return
        for req in misses:
            self.image_features(req)

    def encode_images(self, requests: list[Request]) -> list | None:
        """Features of several requests in one vision forward, or None where the family encodes one at a time."""
        return None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_prompt_length(self, request: Request) -> None:
        n = len(request.prompt_ids)
        if n + 1 > self.context_length:
            raise MMSpecError(f"the prompt is {n} tokens (image placeholders included) but the target's context "
                              f"is {self.context_length}; shorten the prompt or use a smaller image",
                              code="context_length_exceeded", param="messages")
