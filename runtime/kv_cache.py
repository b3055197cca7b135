"""The engine's KV cache: one `transformers.Cache` for the whole running batch.

Per attention layer, a `KVLayer` holds one `[batch, kv_heads, capacity, head_dim]` buffer shared by
all rows, column-aligned with left padding (row r's tokens occupy columns start[r]..length-1). A
decode step writes one column in place (no `torch.cat` copy of the whole cache per step, unlike
`DynamicCache`); capacity grows in chunks of `CAPACITY_CHUNK` columns. Admitting requests pads the
shorter side on the left and stacks the rows (`BatchCache.merge`); dropping rows keeps the remaining
ones and cuts the leading columns no row needs any more (`BatchCache.select`). The engine derives
the 2-D attention mask and the position ids from start[] and the length, so the model sees exactly
what a padded `generate` batch would see.

Only plain attention KV caches: not Mamba / linear-attention hybrids. Sliding-window layers keep
their full history (correct, not memory-saving).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

CAPACITY_CHUNK = 128  # KV columns added when a cache buffer grows


class KVLayer(DynamicLayer):
    """One attention layer's keys and values for the whole batch: preallocated buffers
    `[batch, heads, capacity, head_dim]`, the first `length` columns in use. `keys`/`values` are
    views of the used part, so code that reads them (masks, seq length) sees a normal layer."""

    def __init__(self) -> None:
        super().__init__()
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _set(self, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int) -> None:
        self.k_buf, self.v_buf, self.length = k_buf, v_buf, length
        self.keys, self.values = k_buf[:, :, :length], v_buf[:, :, :length]
        self.dtype, self.device, self.is_initialized = k_buf.dtype, k_buf.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        end = self.length + q
        if self.k_buf is None or end > self.k_buf.shape[2]:
            b, h, _, d = key_states.shape
            cap = end + (CAPACITY_CHUNK if self.k_buf is not None else 0)
            k_buf = key_states.new_zeros((b, h, cap, d))
            v_buf = value_states.new_zeros((b, h, cap, value_states.shape[-1]))
            if self.k_buf is not None and self.length:
                k_buf[:, :, : self.length] = self.k_buf[:, :, : self.length]
                v_buf[:, :, : self.length] = self.v_buf[:, :, : self.length]
            self.k_buf, self.v_buf = k_buf, v_buf
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self._set(self.k_buf, self.v_buf, end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.k_buf = self.v_buf = self.keys = self.values = None
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:  # not used by the engine
        raise NotImplementedError

    def batch_select_indices(self, indices: torch.Tensor) -> None:  # not used by the engine
        raise NotImplementedError


class BatchCache(Cache):
    """The KV cache of the running batch: one `KVLayer` per attention layer."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[KVLayer() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def select(self, rows: torch.Tensor | None, first_col: int, headroom: int) -> None:
        """Keep `rows` (all when None) and the columns from `first_col` on, in fresh buffers with
        `headroom` free columns."""
        for layer in self.layers:
            layer._set(*self._copy(layer, rows, first_col, headroom))

    def subset(self, rows: torch.Tensor, first_col: int, headroom: int) -> BatchCache:
        """A new cache holding `rows` and the columns from `first_col` on; this one is unchanged."""
        out = BatchCache(len(self.layers))
        for mine, theirs in zip(self.layers, out.layers):
            theirs._set(*self._copy(mine, rows, first_col, headroom))
        return out

    def rewind(self, length: int) -> None:
        """Forget the columns from `length` on: what a step that failed half-way wrote in some layers."""
        for layer in self.layers:
            if layer.length > length:
                layer._set(layer.k_buf, layer.v_buf, length)

    @staticmethod
    def _copy(layer: KVLayer, rows: torch.Tensor | None, first_col: int,
              headroom: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = layer.length - first_col
        k, v = layer.k_buf[:, :, first_col : layer.length], layer.v_buf[:, :, first_col : layer.length]
        if rows is not None:
            idx = rows.to(k.device)  # layers can sit on different GPUs (device_map="auto")
            k, v = k.index_select(0, idx), v.index_select(0, idx)
        kb = k.new_zeros((k.shape[0], k.shape[1], n + headroom, k.shape[3]))
        vb = v.new_zeros((v.shape[0], v.shape[1], n + headroom, v.shape[3]))
        kb[:, :, :n], vb[:, :, :n] = k, v
        return kb, vb, n

    def merge(self, other: BatchCache, headroom: int) -> tuple[int, int]:
        """Append `other`'s rows after ours, right-aligned on the columns. Returns the column
        shifts (ours, theirs) that the rows' start columns must be moved by."""
        la, lb = self.length, other.length
        n = max(la, lb)
        for mine, theirs in zip(self.layers, other.layers):
            ba, bb = mine.k_buf.shape[0], theirs.k_buf.shape[0]
            h, d = mine.k_buf.shape[1], mine.k_buf.shape[3]
            kb = mine.k_buf.new_zeros((ba + bb, h, n + headroom, d))
            vb = mine.v_buf.new_zeros((ba + bb, h, n + headroom, mine.v_buf.shape[3]))
            kb[:ba, :, n - la : n], vb[:ba, :, n - la : n] = mine.keys, mine.values
            kb[ba:, :, n - lb : n], vb[ba:, :, n - lb : n] = theirs.keys, theirs.values
            mine._set(kb, vb, n)
        return n - la, n - lb
