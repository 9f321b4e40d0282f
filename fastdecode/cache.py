"""Preallocated KV cache: rows are written by slot, so undoing a rejected draft costs nothing.

The model appends rows at `length`; the engine then keeps what the verifier accepted with `compact`
(or drops rows with `truncate`). The cache never decides what to keep: it only moves rows it is told to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)  # (L, B, kvh, S_max, hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # rows 0 .. length-1 are valid

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def is_trimmable(self) -> bool:
        return True

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} rows to {length}")
        self.length = length

    def compact(self, start: int, keep: Sequence[int]) -> None:
        """Move the rows at slots `keep` (ascending, all >= start) to `start, start+1, …`; drop the rest.

        Example: start=10, keep=[10, 12, 15] -> rows 12 and 15 move to slots 11 and 12, length becomes 13.
        """
        n = len(keep)
        if n and (keep[0] < start or keep[-1] >= self.length):
            raise ValueError(f"compact: slots {list(keep)} outside {start}..{self.length - 1}")
        if any(slot != start + i for i, slot in enumerate(keep)):
            src = torch.tensor(list(keep), device=self.k.device)
            self.k[:, :, :, start : start + n] = self.k[:, :, :, src]  # index_select copies first: no overlap hazard
            self.v[:, :, :, start : start + n] = self.v[:, :, :, src]
        self.length = start + n
