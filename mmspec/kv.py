"""KV caches for batches of rows that each keep their own length: one cache of *slots* shared by the rows.

Every forward appends the same number of slots T to every row (rows with fewer new tokens are padded); after
acceptance each row keeps some of its new slots (a prefix for a chain, the accepted path for a tree) and the
rest become holes. Nothing is moved at that point: holes are masked out of every later attention (a 4-D mask
the models take as is), positions are given explicitly, so a row's numbers never depend on its batch mates'.
Trailing holes are cropped, and when holes pile up the rows are gathered back into consecutive slots
(compaction, EAGLE's ``retrieve_indices`` gather for a tree's accepted path). Batch 1 and chains are cases of
the same code: one row, parents ``[-1, 0, 1, ...]``.

Decoders of several layer types get one mask per type (``{layer_type: mask}``): a sliding window is one more mask
term over exact positions (the cache keeps every key), and linear-attention layers (Qwen3.5), which hold a conv and
a recurrent state per row instead of keys, take none; their state is rolled back by keeping the state after each
position a row may keep (``_record`` before a forward, ``_settle`` after acceptance, ``_restore`` on truncation).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, LlamaModel
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from mmspec.errors import MMSpecError

from mmspec.trees import ancestor_matrices, chain

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; speak whichever this install understands.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

# holes a batch may carry before its rows are gathered into consecutive slots again
COMPACT_SLACK = 24

# layer types whose keys are limited to the last ``config.sliding_window`` positions (on top of the causal rule)
WINDOWED = ("sliding_attention",)
# the layer types the cache models: attention (full or windowed) by masks, linear attention by its states
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
# a recurrent row can be truncated back this many positions (its linear layers' states are kept per position)
STATE_HISTORY = 32


class SlotCache:
    """Rows (ids given by the caller) in one ``DynamicCache`` of slots. ``lengths[r]``: positions row r holds."""

    def __init__(self, config, device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        types = list(getattr(config, "layer_types", None) or ())
        self.layer_types = sorted(set(types))
        # a window is one more mask term (positions stay exact); the cache keeps every position
        window = getattr(config, "sliding_window", None) if any(t in WINDOWED for t in types) else None
        self.window = int(window) if window else None
        # linear-attention layers (Qwen3.5): a conv + recurrent state per row instead of keys, rolled back by
        # keeping the state after each position of a forward (``_settle``, ``_restore``)
        self.recurrent = "linear_attention" in types
        self.min_keep = 0      # every row keeps at least this many tokens of the next forward (a prefill's prompt)
        self._avail: list[int] = []     # the positions of the last forward whose recurrent states were recorded
        self._states: list[list] = []   # per row: (start, n, per-layer (states, conv inputs), positions) records
        self.cache = self._new_cache()
        self.rows: list = []
        self.lengths: list[int] = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)   # [B, S]
        self._new = 0          # slots appended by the last ``extend``
        # what the model makes of ``attention_mask=None``, so ``extend`` can skip the mask where None says the same:
        # "every slot" (plain sdpa, the eagle head): one token on dense rows; "causal" (a transformers decoder
        # builds its own causal mask): one row (always dense) adding a chain, the path of generate() at batch 1
        # (a prefill then runs sdpa's causal kernel instead of a [L, L] float mask); None: always a mask
        self.none_means: str | None = None

    def _new_cache(self) -> DynamicCache:
        # DynamicCache(config=...) makes sliding layers that drop old keys (rollback and holes need them all):
        # plain layers then, the window lives in the mask; linear-attention layers need the config's layer objects
        windowed = any(t in WINDOWED for t in self.layer_types)
        return DynamicCache() if windowed else DynamicCache(config=self.config)

    def _kv_layers(self) -> list:
        return [layer for layer in self.cache.layers if not isinstance(layer, LinearAttentionCacheLayerMixin)]

    def _linear_layers(self) -> list:
        return [layer for layer in self.cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def index(self, row) -> int:
        return self.rows.index(row)

    def length(self, row) -> int:
        return self.lengths[self.index(row)]

    def empty_like(self) -> "SlotCache":
        """A cache with no rows for the same model (joining rows prefill in one, then ``absorb`` it)."""
        slots = SlotCache(self.config, self.device, self.dtype)
        slots.none_means = self.none_means
        return slots

    # ----- one forward ----------------------------------------------------------------------------
    def extend(self, parents: list[list[int]], past: list | None = None, depth0: list[list[int]] | None = None,
               hidden: bool = False, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for each row's new tokens (``parents[b]``: one entry per token, in the rows' order).

        Returns the 4-D additive attention mask [B, 1, T, S+T] (each token sees its row's committed slots and
        its own ancestors; padding sees only itself) and the tokens' positions [B, T] (length + depth).
        A drafter growing a tree over several forwards passes ``past[b]`` ([n_b, S] bool: the existing slots each
        token sees, e.g. committed ones plus its ancestors from earlier forwards), ``depth0[b]`` (each token's
        depth under the committed sequence) and ``hidden=True`` (the new slots stay invisible to later tokens
        unless ``past`` names them; the next ``tidy`` crops them). ``groups`` [B, T] (Gemma 3's prefill): new tokens
        of one image (same id >= 0) see each other both ways. A decoder of several layer types gets a dict
        ``{layer_type: mask}`` instead of one mask (``_masks``).
        """
        B = len(self.rows)
        assert len(parents) == B
        T = max((len(p) for p in parents), default=0)
        if past is None and depth0 is None and not hidden and T:
            full = chain(T)
            if all(p == full for p in parents):
                return self._extend_chains(T, groups)
        if self.recurrent and T:
            # a linear layer feeds a forward's tokens through one recurrence: siblings would see each other
            if hidden or past is not None or any(list(p) != chain(len(p)) for p in parents):
                raise MMSpecError("this model has linear-attention (recurrent) layers, which cannot verify or draft "
                                  "a tree in one forward; use a chain (tree_nodes=None)", param="tree_nodes")
            self._record(T)
        # every row's tree at once, on the device (no per-row or per-node tensor work)
        counts = torch.tensor([len(p) for p in parents], dtype=torch.long, device=self.device)
        new_valid = torch.arange(T, device=self.device)[None] < counts[:, None]          # [B, T]
        own = ancestor_matrices(parents, T, self.device)                                 # padding: itself only
        if depth0 is None:
            depth = own.sum(-1) - 1                     # a token's ancestors but itself (padding: none)
        else:
            depth = torch.tensor([list(d) + [0] * (T - len(d)) for d in depth0], dtype=torch.long,
                                 device=self.device).reshape(B, T)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device)[:, None] + depth
        # [B, T, S]: committed slots for real tokens; padding sees none of them
        seen = self.valid[:, None, :] & new_valid[:, :, None]
        if past is not None:
            seen = seen.clone()
            for b, vis in enumerate(past):
                if vis is not None and vis.shape[0]:
                    seen[b, : vis.shape[0]] = vis.to(self.device)
        allowed = torch.cat([seen, own], dim=-1)
        mask = self._masks(allowed, positions, groups)
        self.valid = torch.cat([self.valid, torch.zeros_like(new_valid) if hidden else new_valid], dim=1)
        self._new = T
        return mask, positions

    def _extend_chains(self, T: int, groups: torch.Tensor | None = None) -> tuple:
        """``extend`` when every row adds a chain of T tokens (every round of plain drafting and verifying):
        the same mask and positions without the per-row loop, or ``None`` where ``none_means`` says None is
        the same mask (dense rows: no holes, as every row at batch 1)."""
        B, S = len(self.rows), self.slots
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        positions = (lengths[:, None] + torch.arange(T)).to(self.device)
        self._new = T
        if self.recurrent:
            self._record(T)
        if (self.none_means == "causal" and B == 1 or self.none_means == "every slot" and T == 1) \
                and all(n == S for n in self.lengths) and self.window is None and groups is None:
            self.valid = torch.ones(B, S + T, dtype=torch.bool, device=self.device)
            return None, positions
        own = torch.ones(T, T, dtype=torch.bool, device=self.device).tril().expand(B, T, T)
        allowed = torch.cat([self.valid[:, None, :].expand(B, T, S), own], dim=-1)
        mask = self._masks(allowed, positions, groups)
        self.valid = torch.cat([self.valid, torch.ones(B, T, dtype=torch.bool, device=self.device)], dim=1)
        return mask, positions

    def commit(self, keep: list[list[int]]) -> None:
        """After acceptance: row b keeps ``keep[b]`` (indices into its last new tokens, in order), the rest of
        them become holes."""
        T, S = self._new, self.slots
        if self.recurrent and T:
            self._settle(keep)
        every = list(range(T))
        if T and not all(list(k) == every for k in keep):
            tail = torch.zeros(len(self.rows), T, dtype=torch.bool)
            for b, idx in enumerate(keep):
                tail[b, list(idx)] = True
            self.valid[:, S - T:] = tail.to(self.device)
        self.lengths = [n + len(k) for n, k in zip(self.lengths, keep)]
        self._new = 0
        self.tidy()

    def truncate(self, row, length: int) -> None:
        """Keep only the first ``length`` positions of ``row``."""
        b = self.index(row)
        if length >= self.lengths[b]:
            return
        if self.recurrent:
            self._restore(b, length)
        order = self.valid[b].cumsum(0)
        self.valid[b] &= order <= length
        self.lengths[b] = length
        self.tidy()

    # ----- rows join and leave --------------------------------------------------------------------
    def add_empty(self, row) -> None:
        """A row with nothing cached yet (its prefill comes with the next ``extend``); only before any forward
        (rows join a running batch by ``absorb``)."""
        assert not self.slots, "rows join a running batch by ``absorb``"
        self.rows.append(row)
        self.lengths.append(0)
        self._states.append([])
        self.valid = torch.zeros(len(self.rows), 0, dtype=torch.bool, device=self.device)

    def absorb(self, other: "SlotCache") -> None:
        """Take ``other``'s rows (prefilled on their own) into this batch, padding the shorter side on the left."""
        if not self.rows:
            self.__dict__.update({k: v for k, v in other.__dict__.items()})
            return
        a, b = self.slots, other.slots
        self._pad_left(max(a, b) - a)
        other._pad_left(max(a, b) - b)
        for mine, theirs in zip(self._kv_layers(), other._kv_layers()):
            if theirs.get_seq_length() or mine.get_seq_length():
                mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
                mine.values = torch.cat([mine.values, theirs.values], dim=0)
        for mine, theirs in zip(self._linear_layers(), other._linear_layers()):
            mine.conv_states[0] = torch.cat([mine.conv_states[0], theirs.conv_states[0]])
            mine.recurrent_states[0] = torch.cat([mine.recurrent_states[0], theirs.recurrent_states[0]])
        self._states += other._states
        self.valid = torch.cat([self.valid, other.valid], dim=0)
        self.rows += other.rows
        self.lengths += other.lengths

    def remove(self, rows) -> None:
        drop = set(rows)
        keep = [i for i, r in enumerate(self.rows) if r not in drop]
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self._kv_layers():
            if layer.get_seq_length():
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
        for layer in self._linear_layers():
            if layer.conv_states[0] is not None:
                layer.conv_states[0] = layer.conv_states[0].index_select(0, idx)
                layer.recurrent_states[0] = layer.recurrent_states[0].index_select(0, idx)
        self._states = [self._states[i] for i in keep]
        self.valid = self.valid.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        if not self.rows:
            self.cache = self._new_cache()
            self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.tidy()

    # ----- housekeeping ---------------------------------------------------------------------------
    def _pad_left(self, n: int) -> None:
        if n <= 0:
            return
        for layer in self._kv_layers():
            if layer.get_seq_length():
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, n, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, n, 0))
        self.valid = torch.nn.functional.pad(self.valid, (n, 0))

    def _slice(self, start: int, stop: int) -> None:
        for layer in self._kv_layers():
            if layer.get_seq_length():
                layer.keys = layer.keys[:, :, start:stop]
                layer.values = layer.values[:, :, start:stop]
        self.valid = self.valid[:, start:stop]

    def tidy(self) -> None:
        """Crop slots no row uses at either end; gather rows into consecutive slots when holes pile up (at
        batch 1 at once, so a single request's cache is always dense, as a plain ``generate()``'s)."""
        if not self.rows or not self.slots or (len(self.rows) == 1 and self.lengths[0] == self.slots):
            return   # nothing to crop or gather (one dense row)
        used = self.valid.any(0).nonzero()
        if used.numel() == 0:
            self._slice(0, 0)
            return
        start, stop = int(used[0]), int(used[-1]) + 1
        if start or stop < self.slots:
            self._slice(start, stop)
        longest = max(self.lengths)
        slack = 0 if len(self.rows) == 1 else COMPACT_SLACK
        if self.slots - longest > slack:
            self._compact(longest)

    def _compact(self, longest: int) -> None:
        # [B, longest]: each row's valid slots, in order, right-aligned (left padding points at slot 0)
        order = torch.arange(self.slots, device=self.device).expand_as(self.valid)
        key = torch.where(self.valid, order, -1)
        # sort so invalid (-1) come first, then valid slots ascending; take the last ``longest``
        idx = key.sort(dim=1).values[:, -longest:]
        new_valid = idx >= 0
        idx = idx.clamp_min(0)
        for layer in self._kv_layers():
            if layer.get_seq_length():
                g = idx[:, None, :, None]
                layer.keys = layer.keys.gather(2, g.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
                layer.values = layer.values.gather(2, g.expand(-1, layer.values.shape[1], -1,
                                                                layer.values.shape[-1]))
        self.valid = new_valid


    # ----- masks per layer type: windows, image blocks --------------------------------------------
    def _masks(self, allowed: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor | None = None):
        """``allowed`` [B, T, S+T] (before this forward's slots are marked valid) -> the additive mask
        [B, 1, T, S+T], or ``{layer_type: mask}`` for a decoder of several layer types (a ready 4-D tensor would
        reach every layer: a window would be lost); linear-attention layers take no mask (None)."""
        if groups is not None:
            g = groups.to(self.device)
            block = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] >= 0)
            allowed = allowed.clone()
            allowed[:, :, -g.shape[1]:] |= block

        def additive(ok):
            mask = torch.zeros(ok.shape, dtype=self.dtype, device=self.device)
            return mask.masked_fill_(~ok, torch.finfo(self.dtype).min)[:, None]

        windowed = allowed & self._in_window(positions) if self.window else allowed
        if len(self.layer_types) <= 1:
            return additive(windowed if self.layer_types and self.layer_types[0] in WINDOWED else allowed)
        full = additive(allowed)
        return {t: None if t == "linear_attention" else additive(windowed) if t in WINDOWED else full
                for t in self.layer_types}

    def _in_window(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, T, S+T]: key position > query position - window. A committed slot's position is its rank among
        the row's valid slots; an invalid slot (hole, or a tree node from an earlier forward that ``past``
        shows) counts as inside the window: holes are masked anyway, and such nodes sit within the tree's depth
        of the query (trees are far shallower than any window)."""
        rank = self.valid.long().cumsum(1) - 1
        committed = torch.where(self.valid, rank, torch.iinfo(torch.long).max)
        keys = torch.cat([committed, positions.to(self.device)], dim=1)
        return keys[:, None, :] > positions.to(self.device)[:, :, None] - self.window

    # ----- recurrent (linear-attention) layers ----------------------------------------------------
    def _record(self, T: int) -> None:
        """Before a forward of T tokens: the linear layers record the state after each position a row may keep
        (transformers' past recording: those positions go through the token-by-token kernel, as generate()'s
        decoding steps do; the earlier ones of a prefill through the chunked kernel)."""
        span = min(T, T - self.min_keep + 1)
        self._avail = [0] + list(range(T - span + 1, T + 1))
        for layer in self._linear_layers():
            layer.activate_past_recording(recurrent_states_to_keep=span)

    def _settle(self, keep: list[list[int]]) -> None:
        """After a forward: each row's linear-layer state becomes the one after the tokens it keeps (a prefix:
        the rest, rejected drafts and padding, leave no trace), and the states after each kept position are
        remembered for ``truncate``."""
        T = self._new
        counts = []
        for idx in keep:
            if list(idx) != list(range(len(idx))):
                raise MMSpecError("this model has linear-attention (recurrent) layers: each row keeps a prefix of "
                                  "a forward's tokens only (no trees)", param="tree_nodes")
            counts.append(len(idx))
        where = {p: i for i, p in enumerate(self._avail)}
        if any(n not in where for n in counts):
            raise MMSpecError(f"internal: recurrent states after positions {counts} were not recorded "
                              f"(recorded: {self._avail})")
        B = len(counts)
        sel = torch.tensor([where[n] for n in counts], device=self.device)
        rows = torch.arange(B, device=self.device)
        records = [[] for _ in range(B)]
        for layer in self._linear_layers():
            # [positions recorded, B, ...]: the state before the forward, after each recorded position, after all
            states = torch.stack(list(layer.recurrent_states_history[0]) + [layer.recurrent_states[0]])
            K, conv = layer.conv_kernel_size[0], layer.conv_states[0]
            if conv.shape[-1] == T:    # a first forward: no earlier inputs (zeros, as transformers pads)
                conv = torch.nn.functional.pad(conv, (K, 0))
            # the conv state after n tokens is the K inputs before position n: columns [n, n + K)
            cols = (torch.tensor(counts, device=self.device)[:, None] + torch.arange(K, device=self.device))
            layer.recurrent_states[0] = states[sel, rows].contiguous()
            layer.conv_states[0] = conv.gather(2, cols[:, None, :].expand(B, conv.shape[1], K)).contiguous()
            layer.recurrent_states_history[0] = []
            for b in range(B):
                records[b].append((states[:, b], conv[b]))
        for b, n in enumerate(counts):
            start = self.lengths[b]
            kept = [r for r in self._states[b] if r[0] + r[1] >= start + n - STATE_HISTORY]
            self._states[b] = kept + [(start, n, records[b], list(self._avail))]
        self.min_keep = 0

    def _restore(self, b: int, length: int) -> None:
        """Row b's linear-layer state back to the one after ``length`` positions (``truncate``)."""
        for start, n, per_layer, avail in reversed(self._states[b]):
            j = length - start
            if 0 <= j <= n and j in avail:
                i = avail.index(j)
                for layer, (states, conv) in zip(self._linear_layers(), per_layer):
                    K = layer.conv_kernel_size[0]
                    layer.recurrent_states[0][b] = states[i]
                    layer.conv_states[0][b] = conv[:, j:j + K]
                # what came after ``length`` is gone
                self._states[b] = [(s, min(m, length - s), p, a) for s, m, p, a in self._states[b] if s <= length]
                return
        raise MMSpecError(f"cannot roll this recurrent model's row back to {length} positions: its state there "
                          f"was not kept (at most {STATE_HISTORY} positions back)")
