"""`HashGridEncoder`: the hash-grid encoding as an nn.Module with a learnable table."""
from __future__ import annotations

import torch
from torch import nn

from kernels.hashgrid.backends import get_encode_fn, resolve
from kernels.hashgrid.config import HashGridConfig


class HashGridEncoder(nn.Module):
    """Multi-resolution hash encoding of points in [0,1]^3.

    backend: "auto" (fastest available for the input's device) or a backend name;
    resolved on the first forward per device and kept.
    """

    def __init__(
        self, config: HashGridConfig | None = None, backend: str = "auto", table_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.config = config or HashGridConfig()
        self.requested_backend = backend
        c = self.config
        # Instant-NGP initialises the table uniformly in [-1e-4, 1e-4].
        self.table = nn.Parameter(torch.empty(c.n_levels, c.table_size, c.n_features, dtype=table_dtype))
        nn.init.uniform_(self.table, -1e-4, 1e-4)
        self._resolved: dict[str, str] = {}

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def backend_for(self, device: torch.device) -> str:
        if device.type not in self._resolved:
            self._resolved[device.type] = resolve(self.requested_backend, device)
        return self._resolved[device.type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3) positions in [0, 1] (clamped). Returns (N, L*F) float32 features."""
        if x.dim() != 2 or x.shape[1] != 3:
            raise ValueError(f"hash-grid input must be (N, 3), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"hash-grid input must be floating point, got {x.dtype}")
        if x.device != self.table.device:
            raise ValueError(f"input on {x.device} but the table is on {self.table.device}")
        encode = get_encode_fn(self.backend_for(x.device))
        return encode(x.contiguous(), self.table, self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"levels={c.n_levels}, features={c.n_features}, table=2^{c.log2_table_size}, "
            f"res={c.base_resolution}..{c.max_resolution}, backend={self.requested_backend}"
        )
