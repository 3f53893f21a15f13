"""The KV cache: pre-allocated keys and values of every layer, one row per sequence, each row with
its own length.

One type serves every decoder: the engine's batches (rows of equal length: a padded prefill,
then one slot per step for every row), beam search (rows reordered) and the serving batcher
(rows of different lengths that join and leave). A forward writes the rows chosen with `select`
(all by default): row r's new keys go to slots [lengths[r], lengths[r] + L), and attention reads
slots [0, end) where end = max(lengths) + L; masks.py says which of those a token may see.
`advance(L)` then adds L to the selected rows' lengths (GLMModel.forward calls it).

The cache may be narrower than the activations (FP16 halves its memory and its reads per
token); `update` returns keys and values in the activations' dtype. The fused C++ step
(infer/fused.py) writes the same tensors through `fused_view`.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0


def fit_cache(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in a cache's `dtype`: clamped to FP16's finite range first when the cache is FP16 and t
    is wider (an overflow would turn into inf, and a row's whole attention into NaN)."""
    if dtype == torch.float16 and t.dtype in (torch.float32, torch.bfloat16, torch.float64):
        t = t.clamp(-FP16_MAX, FP16_MAX)
    return t.to(dtype)


class KVCache:
    def __init__(self, num_layers: int, rows: int, heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (rows, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.lengths = torch.zeros(rows, dtype=torch.long)  # keys held by each row (on the CPU)
        self.rows = slice(0, rows)  # the rows the next forward writes
        self._starts: tuple[list[int], bool] | None = None  # (write slots, all equal), while a forward runs

    # -- what the decoders call ------------------------------------------------------------------
    def select(self, rows: slice) -> KVCache:
        """The rows the next forward writes and reads (a contiguous range); returns self."""
        self.rows, self._starts = rows, None
        return self

    @property
    def seen(self) -> int:
        """The longest selected row (for rows of equal length: every row's length)."""
        return int(self.lengths[self.rows].max())

    def room(self) -> int:
        return self.max_len - self.seen

    def check_room(self, n: int) -> int:
        """The end of the next n positions of the longest row; an error if they do not fit."""
        end = self.seen + n
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        return end

    def advance(self, n: int) -> None:
        self.lengths[self.rows] += n
        self._starts = None

    def move(self, src: int, dst: int) -> None:
        """Copy row src (keys, values, length) into row dst."""
        n = int(self.lengths[src])
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row i continues row index[i]."""
        for layer in range(len(self.k)):
            self.k[layer] = self.k[layer].index_select(0, index.to(self.k[layer].device))
            self.v[layer] = self.v[layer].index_select(0, index.to(self.v[layer].device))
        self.lengths = self.lengths.index_select(0, index.cpu())

    # -- what the attention layers and the fused step call -------------------------------------
    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [rows, heads, L, d] at each selected row's length; return the rows' keys and
        values [rows, heads, end, d] in k's dtype."""
        n = k.shape[2]
        starts, uniform = self._write_starts()
        end = self.check_room(n)
        ck, cv = self.k[layer_id][self.rows], self.v[layer_id][self.rows]
        if uniform:
            s = starts[0]
            ck[:, :, s : s + n] = fit_cache(k, ck.dtype)
            cv[:, :, s : s + n] = fit_cache(v, cv.dtype)
        else:  # rows of different lengths: one new token each (the serving batcher's steps)
            if n != 1:
                raise ValueError("rows of different lengths take one token per step")
            index = torch.arange(len(starts), device=ck.device)
            at = torch.tensor(starts, device=ck.device)
            ck[index, :, at] = fit_cache(k[:, :, 0], ck.dtype)
            cv[index, :, at] = fit_cache(v[:, :, 0], cv.dtype)
        return ck[:, :, :end].to(k.dtype), cv[:, :, :end].to(v.dtype)

    def fused_view(self, batch: int, length: int = 1):
        """For the fused step: (K list, V list of the selected rows, each row's first write slot [B],
        end of the keys attended)."""
        if self.rows.stop - self.rows.start != batch:
            raise ValueError(f"{batch} rows fed, {self.rows.stop - self.rows.start} selected in the cache")
        end = self.check_room(length)
        whole = self.rows == slice(0, len(self.lengths))
        ks = self.k if whole else [k[self.rows] for k in self.k]
        vs = self.v if whole else [v[self.rows] for v in self.v]
        return ks, vs, self.lengths[self.rows].clone(), end

    def _write_starts(self) -> tuple[list[int], bool]:
        """Each selected row's write slot, and whether they are all equal (once per forward)."""
        if self._starts is None:
            starts = self.lengths[self.rows].tolist()
            self._starts = starts, len(set(starts)) == 1
        return self._starts


class StaticKVCache(KVCache):
    """gpt-fast's cache layout for a compiled decode step (infer/engine.py, `compile_decode`).

    A decode step writes each row's new key at a slot held in a device tensor (`write_at`, set by
    the engine around the step) and attends every slot [0, max_len), the mask hiding the unused
    ones: every step has the same shapes and no host round trip, so one compiled graph (one CUDA
    graph) serves them all. Prefills (several tokens) take KVCache's path. Beam reordering
    copies in place, so the buffers keep their addresses (CUDA graphs replay on fixed addresses).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.write_at: torch.Tensor | None = None  # [rows selected] slots on the device, during a step
        import torch._dynamo  # lazily: a plain decode never needs it

        for t in (*self.k, *self.v):
            torch._dynamo.mark_static_address(t)

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write_at is None:
            return super().update(layer_id, k, v)
        # written into the whole buffer at absolute rows (writing through a row slice made inductor
        # copy those rows' whole cache, every layer and step), then the selected rows read back
        ck, cv = self.k[layer_id], self.v[layer_id]
        index = torch.arange(self.rows.start, self.rows.stop, device=ck.device)
        ck[index, :, self.write_at] = fit_cache(k[:, :, 0], ck.dtype)
        cv[index, :, self.write_at] = fit_cache(v[:, :, 0], cv.dtype)
        return ck[self.rows].to(k.dtype), cv[self.rows].to(v.dtype)

    def reset(self) -> StaticKVCache:
        """Empty again, for the next generation (the engine reuses a static cache: a CUDA graph
        replays on its addresses; a new cache would record the graph again)."""
        self.lengths.zero_()
        self.rows, self._starts, self.write_at = slice(0, len(self.lengths)), None, None
        return self

    def reorder(self, index: torch.Tensor) -> None:
        for t in (*self.k, *self.v):
            t.copy_(t.index_select(0, index.to(t.device)))
        self.lengths = self.lengths.index_select(0, index.cpu())
