"""DMTet: a deformable tetrahedral grid with a learnable SDF, extracted by marching tetrahedra.

Each lattice vertex carries an SDF value (negative inside) and an offset bounded to
``deformation_bound`` grid spacings through a tanh, so the grid can snap to sharp
features without tangling. :meth:`DMTet.forward` extracts the surface
differentiably (gradients reach the SDF and the offsets); :meth:`DMTet.subdivide_surface`
doubles the resolution around the current surface for coarse-to-fine refinement;
:meth:`DMTet.extract_mesh` returns a cleaned mesh for export.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine_server.geometry.marching_tets import marching_tets
from engine_server.geometry.mesh_sdf import _as_numpy_mesh, mesh_to_sdf, unsigned_distance
from engine_server.geometry.mesh_utils import clean_mesh
from engine_server.geometry.regularizers import (
    deformation_loss,
    laplacian_smoothness_loss,
    normal_consistency_loss,
    sdf_sign_flip_loss,
)
from engine_server.geometry.subdivide import subdivide_surface
from engine_server.geometry.tet_grid import grid_spacing, surface_tet_candidates, tet_grid

logger = logging.getLogger(__name__)


@dataclass
class DMTetConfig:
    """Configuration of a :class:`DMTet`."""

    resolution: int = 64
    """Cubes per axis of the tetrahedral lattice (six tetrahedra per cube)."""
    grid_scale: float = 1.0
    """Half-size of the grid: vertices span [-grid_scale, grid_scale]^3."""
    deformation_bound: float = 0.45
    """Largest vertex offset per axis, as a fraction of the grid spacing (tanh-bounded)."""
    min_component_fraction: float = 0.01
    """Connected pieces with less than this share of the surface area are dropped on extraction."""

    def __post_init__(self) -> None:
        if self.grid_scale <= 0:
            raise ValueError(f"grid_scale must be positive, got {self.grid_scale}")
        if not 0 <= self.deformation_bound < 1:
            raise ValueError(f"deformation_bound must be in [0, 1) grid spacings, got {self.deformation_bound}")


SDFFunction = Callable[[torch.Tensor], torch.Tensor]
"""Maps points (P, 3) to values (P,): an SDF, or a density when initialising with kind="density"."""


def _nudge_zeros(sdf: torch.Tensor, spacing: float) -> torch.Tensor:
    """Move exact zeros slightly outside, so no surface vertex sits exactly on a grid vertex."""
    return torch.where(sdf == 0, torch.full_like(sdf, 1e-3 * spacing), sdf)


class DMTet(nn.Module):
    """A learnable SDF and bounded per-vertex deformation on a tetrahedral grid."""

    def __init__(self, config: DMTetConfig | None = None, sdf: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config or DMTetConfig()
        vertices, tets = tet_grid(self.config.resolution)
        self.spacing = grid_spacing(self.config.resolution) * self.config.grid_scale
        """Current grid spacing (halved near the surface by each subdivision)."""
        self.lattice_resolution: int | None = self.config.resolution
        """The lattice's resolution while the grid is still the regular lattice, else None."""
        # The lattice is rebuilt from the config, so it stays out of the state dict
        # until a subdivision makes the grid irregular.
        self.register_buffer("base_vertices", vertices * self.config.grid_scale, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        n = vertices.shape[0]
        if sdf is None:
            sdf = torch.zeros(n)
        if sdf.shape != (n,):
            raise ValueError(f"initial sdf must have shape ({n},) for resolution {self.config.resolution}, "
                             f"got {tuple(sdf.shape)}")
        self.sdf = nn.Parameter(sdf.detach().to(torch.float32).clone())
        self.deformation_raw = nn.Parameter(torch.zeros(n, 3))

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_sdf_fn(
        cls,
        fn: SDFFunction,
        config: DMTetConfig | None = None,
        kind: str = "sdf",
        threshold: float = 0.0,
        redistance: bool | None = None,
        chunk: int = 262_144,
    ) -> DMTet:
        """Initialise from a field evaluated at the grid vertices.

        ``kind="sdf"``: ``fn`` returns a signed distance, negative inside (``threshold``
        is subtracted). ``kind="density"``: ``fn`` returns a density such as a radiance
        field's sigma; the SDF is ``threshold - density`` (inside where denser than the
        threshold). ``redistance`` (default: on for densities) replaces the magnitudes by
        the distance to the extracted iso-surface, keeping the field's signs, so the
        SDF is metric and well scaled for optimisation.
        """
        if kind not in ("sdf", "density"):
            raise ValueError(f"kind must be 'sdf' or 'density', got {kind!r}")
        config = config or DMTetConfig()
        vertices, _ = tet_grid(config.resolution)
        points = vertices * config.grid_scale
        values = []
        with torch.no_grad():
            for s in range(0, points.shape[0], chunk):
                out = fn(points[s:s + chunk])
                if out.shape not in ((min(chunk, points.shape[0] - s),), (min(chunk, points.shape[0] - s), 1)):
                    raise ValueError(f"field function must return (P,) or (P, 1) values, got {tuple(out.shape)}")
                values.append(out.reshape(-1).float().cpu())
        field = torch.cat(values)
        sdf = field - threshold if kind == "sdf" else threshold - field
        if not bool(torch.isfinite(sdf).all()):
            raise ValueError("the field function returned NaN or infinite values")
        spacing = grid_spacing(config.resolution) * config.grid_scale
        sdf = _nudge_zeros(sdf, spacing)
        model = cls(config, sdf)
        if redistance if redistance is not None else kind == "density":
            model._redistance()
        return model

    @classmethod
    def from_mesh(cls, vertices: np.ndarray | torch.Tensor, faces: np.ndarray | torch.Tensor,
                  config: DMTetConfig | None = None) -> DMTet:
        """Initialise from a triangle mesh already in grid coordinates (see ``normalize_mesh``).

        The SDF is the mesh's signed distance (winding-number sign, so small holes and
        flipped faces are tolerated). The mesh must lie inside the grid.
        """
        v, f = _as_numpy_mesh(vertices, faces)
        config = config or DMTetConfig()
        used = v[np.unique(f)] if len(f) else v
        if len(f) == 0:
            raise ValueError("cannot initialise a DMTet from a mesh with no faces")
        if np.abs(used).max() >= config.grid_scale:
            raise ValueError(f"mesh extends to {np.abs(used).max():.3f}, outside the grid's half-size "
                             f"{config.grid_scale}: normalize it first (normalize_mesh)")
        grid, _ = tet_grid(config.resolution)
        sdf = mesh_to_sdf(grid * config.grid_scale, v, f)
        return cls(config, _nudge_zeros(sdf, grid_spacing(config.resolution) * config.grid_scale))

    @torch.no_grad()
    def _redistance(self) -> None:
        """Replace |sdf| by the distance to the current surface, keeping the signs."""
        out = self.forward()
        if out["faces"].shape[0] == 0:
            logger.warning("DMTet redistance: the field has no surface at this threshold; keeping raw values")
            return
        dist = unsigned_distance(self.base_vertices.cpu(), out["vertices"].cpu(), out["faces"].cpu())
        dist = dist.clamp(min=1e-3 * self.spacing).to(self.sdf.device)
        self.sdf.copy_(torch.where(self.sdf < 0, -dist, dist))

    # ---------------------------------------------------------------- geometry
    @property
    def deformation(self) -> torch.Tensor:
        """(N, 3) vertex offsets, each component within ``deformation_bound`` grid spacings."""
        return self.config.deformation_bound * self.spacing * torch.tanh(self.deformation_raw)

    def vertices(self) -> torch.Tensor:
        """(N, 3) deformed grid vertices."""
        return self.base_vertices + self.deformation

    def forward(self) -> dict[str, torch.Tensor]:
        """Differentiable surface: ``vertices`` (V, 3), ``faces`` (F, 3) and the sign-changing grid ``edges`` (V, 2)."""
        candidates = None
        if self.lattice_resolution is not None:
            candidates = surface_tet_candidates(self.sdf, self.lattice_resolution)
        verts, faces, edges = marching_tets(self.vertices(), self.tets, self.sdf, candidates=candidates,
                                            return_edges=True)
        return {"vertices": verts, "faces": faces, "edges": edges}

    def regularizers(self, mesh: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Named regularisers, to be weighted by the caller (pass ``forward()``'s output to reuse it).

        ``sdf_sign_flip``: BCE across sign-changing edges (DMTet / nvdiffrec);
        ``deformation``: mean squared offset in grid spacings (on top of the tanh bound);
        ``laplacian`` and ``normal_consistency``: smoothness of the extracted mesh (Magic3D).
        """
        mesh = mesh if mesh is not None else self.forward()
        return {
            "sdf_sign_flip": sdf_sign_flip_loss(self.sdf, mesh["edges"]),
            "deformation": deformation_loss(self.deformation, self.spacing),
            "laplacian": laplacian_smoothness_loss(mesh["vertices"], mesh["faces"]),
            "normal_consistency": normal_consistency_loss(mesh["vertices"], mesh["faces"]),
        }

    @torch.no_grad()
    def extract_mesh(self, clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The current surface as numpy arrays: (V, 3) float32 vertices, (F, 3) int64 faces.

        With ``clean``: duplicate vertices merged, pieces under ``min_component_fraction``
        of the area dropped, winding made consistent and outward.
        """
        out = self.forward()
        v = out["vertices"].detach().cpu().numpy().astype(np.float32)
        f = out["faces"].cpu().numpy()
        if clean and len(f):
            return clean_mesh(v, f, min_component_fraction=self.config.min_component_fraction)
        return v, f

    @torch.no_grad()
    def subdivide_surface(self) -> None:
        """Halve the grid spacing around the current surface (see ``subdivide_surface``).

        The current deformation is baked into the vertex positions; new midpoint
        vertices get interpolated SDF values, so the surface is unchanged until
        optimised further. Offsets restart at zero, bounded by the new, halved spacing.
        The parameters are replaced: create the optimiser again afterwards.
        """
        sub = subdivide_surface(self.vertices(), self.tets, self.sdf)
        device = self.sdf.device
        self.spacing /= 2.0
        self.lattice_resolution = None
        self.register_buffer("base_vertices", sub.vertices.detach().contiguous(), persistent=True)
        self.register_buffer("tets", sub.tets.contiguous(), persistent=True)
        self.sdf = nn.Parameter(sub.sdf.detach().clone())
        self.deformation_raw = nn.Parameter(torch.zeros(sub.vertices.shape[0], 3, device=device))
        logger.info("DMTet subdivided: %d vertices, %d tetrahedra", sub.vertices.shape[0], sub.tets.shape[0])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.lattice_resolution is None:
            destination[prefix + "spacing"] = torch.tensor(self.spacing)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A subdivided model's state carries its grid: adopt its shapes before loading.
        if prefix + "tets" in state_dict:
            n = state_dict[prefix + "base_vertices"].shape[0]
            device = self.sdf.device
            self.register_buffer("base_vertices", torch.empty(n, 3, device=device), persistent=True)
            self.register_buffer("tets", torch.empty_like(state_dict[prefix + "tets"], device=device),
                                 persistent=True)
            self.sdf = nn.Parameter(torch.empty(n, device=device))
            self.deformation_raw = nn.Parameter(torch.empty(n, 3, device=device))
            self.lattice_resolution = None
            if prefix + "spacing" in state_dict:
                self.spacing = float(state_dict[prefix + "spacing"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "spacing" in unexpected_keys:
            unexpected_keys.remove(prefix + "spacing")
