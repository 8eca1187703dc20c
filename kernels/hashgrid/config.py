"""Hash-grid encoding configuration (Instant-NGP, Mueller et al. 2022)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

PRIMES = (1, 2654435761, 805459861)
"""Spatial-hash primes, one per axis, as in Instant-NGP."""


@dataclass(frozen=True)
class HashGridConfig:
    """Shape of a multi-resolution hash grid. Every backend uses this same layout."""

    n_levels: int = 16
    """Number of resolution levels L."""
    n_features: int = 2
    """Features per level F."""
    log2_table_size: int = 19
    """log2 of the entries per level T: each level owns 2**T rows of F features."""
    base_resolution: int = 16
    """Cells per axis on the coarsest level."""
    max_resolution: int = 2048
    """Cells per axis on the finest level."""

    def __post_init__(self) -> None:
        if self.n_levels < 1 or self.n_features < 1:
            raise ValueError(f"n_levels and n_features must be >= 1, got {self.n_levels}, {self.n_features}")
        if not 4 <= self.log2_table_size <= 30:
            raise ValueError(f"log2_table_size must be in [4, 30], got {self.log2_table_size}")
        if not 1 <= self.base_resolution <= self.max_resolution:
            raise ValueError(
                f"need 1 <= base_resolution <= max_resolution, got {self.base_resolution}, {self.max_resolution}"
            )

    @property
    def table_size(self) -> int:
        return 1 << self.log2_table_size

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.n_features

    @cached_property
    def resolutions(self) -> tuple[int, ...]:
        """Cells per axis of each level: geometric growth from base to max resolution."""
        if self.n_levels == 1:
            return (self.base_resolution,)
        growth = math.exp((math.log(self.max_resolution) - math.log(self.base_resolution)) / (self.n_levels - 1))
        return tuple(int(math.floor(self.base_resolution * growth**level + 1e-6)) for level in range(self.n_levels))

    @cached_property
    def dense_levels(self) -> tuple[bool, ...]:
        """Per level: True when its (R+1)^3 grid vertices fit in the table (direct indexing, no hash)."""
        return tuple((r + 1) ** 3 <= self.table_size for r in self.resolutions)
