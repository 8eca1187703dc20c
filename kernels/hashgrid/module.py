"""`HashGridEncoder`: the hash-grid encoding as an nn.Module with a learnable table."""
from __future__ import annotations

import torch
from torch import nn

from kernels.hashgrid.backends import EncodeFn, resolve, resolve_and_load
from kernels.hashgrid.config import HashGridConfig


class HashGridEncoder(nn.Module):
    """Multi-resolution hash encoding of points in [0,1]^3.

    backend: "auto" (fastest available for the input's device) or a backend name;
    resolved on the first forward per device and kept.

    Every backend but `tcnn` reads the same learnable `table` (L, 2**T, F), so a trained
    encoder can switch backends (or devices). `tcnn` keeps tiny-cuda-nn's own parameter
    layout and numerics: with backend="tcnn" the module holds `tcnn_params` (inside
    `self.tcnn`) instead of `table`, needs CUDA at construction, and `auto` never picks it.
    """

    def __init__(
        self, config: HashGridConfig | None = None, backend: str = "auto", table_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.config = config or HashGridConfig()
        self.requested_backend = backend
        c = self.config
        self.tcnn: nn.Module | None = None
        if backend == "tcnn":
            from kernels.hashgrid.tcnn_backend import TcnnHashGrid

            resolve("tcnn", torch.device("cuda"))  # a clear error when tinycudann or CUDA is missing
            self.tcnn = TcnnHashGrid(c, dtype=table_dtype)
            self.register_parameter("table", None)
        else:
            # Instant-NGP initialises the table uniformly in [-1e-4, 1e-4].
            self.table = nn.Parameter(torch.empty(c.n_levels, c.table_size, c.n_features, dtype=table_dtype))
            nn.init.uniform_(self.table, -1e-4, 1e-4)
        self._resolved: dict[str, tuple[str, EncodeFn]] = {}

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def backend_for(self, device: torch.device) -> str:
        """The concrete backend used for inputs on `device` (resolved and loaded once)."""
        if self.tcnn is not None:
            return "tcnn"
        if device.type not in self._resolved:
            self._resolved[device.type] = resolve_and_load(self.requested_backend, device)
        return self._resolved[device.type][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3) positions in [0, 1] (clamped). Returns (N, L*F) features in x's dtype."""
        if x.dim() != 2 or x.shape[1] != 3:
            raise ValueError(f"hash-grid input must be (N, 3), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"hash-grid input must be floating point, got {x.dtype}")
        if self.tcnn is not None:
            return self.tcnn(x)
        if x.device != self.table.device:
            raise ValueError(f"input on {x.device} but the table is on {self.table.device}")
        self.backend_for(x.device)
        encode = self._resolved[x.device.type][1]
        return encode(x.contiguous(), self.table, self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"levels={c.n_levels}, features={c.n_features}, table=2^{c.log2_table_size}, "
            f"res={c.base_resolution}..{c.max_resolution}, backend={self.requested_backend}"
        )
