"""KV caches for batches of rows that each keep their own length: one cache of *slots* shared by the rows.

Every forward appends the same number of slots T to every row (rows with fewer new tokens are padded); after
acceptance each row keeps some of its new slots (a prefix for a chain, the accepted path for a tree) and the
rest become holes. Nothing is moved at that point: holes are masked out of every later attention (a 4-D mask
the models take as is), positions are given explicitly, so a row's numbers never depend on its batch mates'.
Trailing holes are cropped, and when holes pile up the rows are gathered back into consecutive slots
(compaction, EAGLE's ``retrieve_indices`` gather for a tree's accepted path). Batch 1 and chains are cases of
the same code: one row, parents ``[-1, 0, 1, ...]``.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, LlamaModel

from mmspec.trees import ancestor_matrix, chain, depths

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; speak whichever this install understands.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

# holes a batch may carry before its rows are gathered into consecutive slots again
COMPACT_SLACK = 24


class SlotCache:
    """Rows (ids given by the caller) in one ``DynamicCache`` of slots. ``lengths[r]``: positions row r holds."""

    def __init__(self, config, device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.cache = DynamicCache(config=config)
        self.rows: list = []
        self.lengths: list[int] = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)   # [B, S]
        self._new = 0          # slots appended by the last ``extend``
        # what the model makes of ``attention_mask=None``, so ``extend`` can skip the mask where None says the same:
        # "every slot" (plain sdpa, the eagle head): one token on dense rows; "causal" (a transformers decoder
        # builds its own causal mask): one row (always dense) adding a chain, the path of generate() at batch 1
        # (a prefill then runs sdpa's causal kernel instead of a [L, L] float mask); None: always a mask
        self.none_means: str | None = None

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
               hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for each row's new tokens (``parents[b]``: one entry per token, in the rows' order).

        Returns the 4-D additive attention mask [B, 1, T, S+T] (each token sees its row's committed slots and
        its own ancestors; padding sees only itself) and the tokens' positions [B, T] (length + depth).
        A drafter growing a tree over several forwards passes ``past[b]`` ([n_b, S] bool: the existing slots each
        token sees, e.g. committed ones plus its ancestors from earlier forwards), ``depth0[b]`` (each token's
        depth under the committed sequence) and ``hidden=True`` (the new slots stay invisible to later tokens
        unless ``past`` names them; the next ``tidy`` crops them).
        """
        B = len(self.rows)
        assert len(parents) == B
        T = max((len(p) for p in parents), default=0)
        if past is None and depth0 is None and not hidden and T:
            full = chain(T)
            if all(p == full for p in parents):
                return self._extend_chains(T)
        new_valid = torch.zeros(B, T, dtype=torch.bool)
        own = torch.zeros(B, T, T, dtype=torch.bool)
        positions = torch.zeros(B, T, dtype=torch.long)
        for b, par in enumerate(parents):
            n = len(par)
            new_valid[b, :n] = True
            own[b, :n, :n] = ancestor_matrix(par, "cpu")
            if n < T:
                own[b, n:, n:] = torch.eye(T - n, dtype=torch.bool)
            d = depths(par) if depth0 is None else depth0[b]
            positions[b, :n] = torch.tensor(d, dtype=torch.long) + self.lengths[b]
            positions[b, n:] = self.lengths[b]
        new_valid = new_valid.to(self.device)
        own = own.to(self.device)
        # [B, T, S]: committed slots for real tokens; padding sees none of them
        seen = self.valid[:, None, :] & new_valid[:, :, None]
        if past is not None:
            seen = seen.clone()
            for b, vis in enumerate(past):
                if vis is not None and vis.shape[0]:
                    seen[b, : vis.shape[0]] = vis.to(self.device)
        allowed = torch.cat([seen, own], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        self.valid = torch.cat([self.valid, torch.zeros_like(new_valid) if hidden else new_valid], dim=1)
        self._new = T
        return mask[:, None], positions.to(self.device)

    def _extend_chains(self, T: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``extend`` when every row adds a chain of T tokens (every round of plain drafting and verifying):
        the same mask and positions without the per-row loop, or ``None`` where ``none_means`` says None is
        the same mask (dense rows: no holes, as every row at batch 1)."""
        B, S = len(self.rows), self.slots
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        positions = (lengths[:, None] + torch.arange(T)).to(self.device)
        self._new = T
        if (self.none_means == "causal" and B == 1 or self.none_means == "every slot" and T == 1) \
                and all(n == S for n in self.lengths):
            self.valid = torch.ones(B, S + T, dtype=torch.bool, device=self.device)
            return None, positions
        own = torch.ones(T, T, dtype=torch.bool, device=self.device).tril().expand(B, T, T)
        allowed = torch.cat([self.valid[:, None, :].expand(B, T, S), own], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        self.valid = torch.cat([self.valid, torch.ones(B, T, dtype=torch.bool, device=self.device)], dim=1)
        return mask[:, None], positions

    def commit(self, keep: list[list[int]]) -> None:
        """After acceptance: row b keeps ``keep[b]`` (indices into its last new tokens, in order), the rest of
        them become holes."""
        T, S = self._new, self.slots
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
        self.valid = torch.zeros(len(self.rows), 0, dtype=torch.bool, device=self.device)

    def absorb(self, other: "SlotCache") -> None:
        """Take ``other``'s rows (prefilled on their own) into this batch, padding the shorter side on the left."""
        if not self.rows:
            self.__dict__.update({k: v for k, v in other.__dict__.items()})
            return
        a, b = self.slots, other.slots
        self._pad_left(max(a, b) - a)
        other._pad_left(max(a, b) - b)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            if theirs.get_seq_length() or mine.get_seq_length():
                mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
                mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.valid = torch.cat([self.valid, other.valid], dim=0)
        self.rows += other.rows
        self.lengths += other.lengths

    def remove(self, rows) -> None:
        drop = set(rows)
        keep = [i for i, r in enumerate(self.rows) if r not in drop]
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            if layer.get_seq_length():
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
        self.valid = self.valid.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        if not self.rows:
            self.cache = DynamicCache(config=self.config)
            self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.tidy()

    # ----- housekeeping ---------------------------------------------------------------------------
    def _pad_left(self, n: int) -> None:
        if n <= 0:
            return
        for layer in self.cache.layers:
            if layer.get_seq_length():
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, n, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, n, 0))
        self.valid = torch.nn.functional.pad(self.valid, (n, 0))

    def _slice(self, start: int, stop: int) -> None:
        for layer in self.cache.layers:
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
        for layer in self.cache.layers:
            if layer.get_seq_length():
                g = idx[:, None, :, None]
                layer.keys = layer.keys.gather(2, g.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
                layer.values = layer.values.gather(2, g.expand(-1, layer.values.shape[1], -1,
                                                                layer.values.shape[-1]))
        self.valid = new_valid

