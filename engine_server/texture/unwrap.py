"""UV unwrapping with xatlas, and the :class:`UVMesh` every texture stage works on.

UV convention (the whole ``engine_server.texture`` package and ``engine_server.export``):
**glTF's**. ``(u, v) = (0, 0)`` is the top-left corner of the texture image and
``(1, 1)`` its bottom-right corner; ``u`` runs along columns (left to right) and ``v``
along rows (top to bottom), so the texel in row ``i``, column ``j`` of an ``(S, S)``
image has its centre at ``((j + 0.5) / S, (i + 0.5) / S)``. Blender (and trimesh, and
OpenGL) put the origin at the bottom-left instead: convert with :func:`flip_v` when
handing UVs to or taking them from those (Blender's glTF importer does this itself).

Positions stay in the engine's world convention (Blender's: right-handed, Z up);
only :mod:`engine_server.export` converts to glTF's Y-up.

Cost: xatlas's chart computation dominates (packing is cheap). Left unbounded, it took
4-10x longer than with our default cap on chart boundary length
(``UnwrapConfig.max_boundary_rel``) on 20k-face meshes, e.g. 9 s vs 1.5 s for a 20k-face
icosphere on a loaded 2-core CPU; the cap costs atlas utilization (about 0.6 against
0.7-0.85). Set ``max_boundary_rel=0`` where texel density matters more than seconds,
and decimate very dense meshes before unwrapping.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class UnwrapConfig:
    """How xatlas charts and packs a mesh."""

    texture_size: int = 1024
    """Texture resolution the atlas is packed for (xatlas estimates texels per unit from it)."""
    padding: int = 4
    """Gap between charts in atlas texels; the texture's gap is padding * texture_size / atlas size."""
    bilinear: bool = True
    """Leave room around charts for texels that bilinear filtering samples."""
    max_iterations: int = 0
    """xatlas chart-growing iterations: 0 is about twice as fast as xatlas's default of 1."""
    max_cost: float = 2.0
    """xatlas's chart cost limit: higher gives fewer, more distorted charts."""
    max_boundary_rel: float = 0.5
    """Cap on a chart's boundary length, times sqrt(surface area); 0 = no cap (xatlas default).

    The cap makes xatlas several times faster on 20k-face meshes (it stops charts from
    growing into shapes whose parametrization xatlas must redo), at the price of a less
    densely packed atlas (utilization about 0.6 instead of 0.7-0.85)."""
    block_align: bool = False
    """Align charts to 4x4 blocks (better packing for block-compressed textures, slower)."""
    rotate_charts: bool = True
    """Let the packer rotate charts for a tighter fit."""

    def __post_init__(self) -> None:
        if self.texture_size < 8:
            raise ValueError(f"UnwrapConfig.texture_size must be >= 8, got {self.texture_size}")
        if self.padding < 0:
            raise ValueError(f"UnwrapConfig.padding must be >= 0, got {self.padding}")
        if self.max_iterations < 0:
            raise ValueError(f"UnwrapConfig.max_iterations must be >= 0, got {self.max_iterations}")
        if self.max_cost <= 0:
            raise ValueError(f"UnwrapConfig.max_cost must be > 0, got {self.max_cost}")
        if self.max_boundary_rel < 0:
            raise ValueError(f"UnwrapConfig.max_boundary_rel must be >= 0, got {self.max_boundary_rel}")


@dataclass
class UVMesh:
    """A triangle mesh with one UV per vertex; vertices on UV seams are duplicated."""

    vertices: np.ndarray
    """(V', 3) float32 positions, engine (Z-up) coordinates."""
    faces: np.ndarray
    """(F, 3) int64 vertex indices into ``vertices``; same faces, same order as the input mesh."""
    uvs: np.ndarray
    """(V', 2) float32 UVs in [0, 1], glTF convention (origin at the image's top-left)."""
    vmapping: np.ndarray
    """(V',) int64: the input-mesh vertex each vertex was copied from."""

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32)
        self.faces = np.ascontiguousarray(self.faces, dtype=np.int64)
        self.uvs = np.ascontiguousarray(self.uvs, dtype=np.float32)
        self.vmapping = np.ascontiguousarray(self.vmapping, dtype=np.int64)
        n = len(self.vertices)
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"UVMesh.vertices must be (V, 3), got {self.vertices.shape}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"UVMesh.faces must be (F, 3), got {self.faces.shape}")
        if self.uvs.shape != (n, 2):
            raise ValueError(f"UVMesh.uvs must be ({n}, 2) to match the vertices, got {self.uvs.shape}")
        if self.vmapping.shape != (n,):
            raise ValueError(f"UVMesh.vmapping must be ({n},), got {self.vmapping.shape}")
        if self.faces.size and (self.faces.min() < 0 or self.faces.max() >= n):
            raise ValueError(f"UVMesh.faces index outside [0, {n})")

    @property
    def num_faces(self) -> int:
        """Number of triangles."""
        return int(self.faces.shape[0])


def to_numpy(x: np.ndarray | torch.Tensor, dtype: type, name: str) -> np.ndarray:
    """A contiguous numpy copy-or-view of ``x`` (numpy array or torch tensor on any device)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    elif not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from err
    return np.ascontiguousarray(x, dtype=dtype)


def check_mesh(vertices: np.ndarray | torch.Tensor, faces: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Validate a triangle mesh; returns (V, 3) float32 vertices and (F, 3) int64 faces as numpy."""
    v = to_numpy(vertices, np.float32, "vertices")
    if isinstance(faces, torch.Tensor) and faces.is_floating_point() or (
        isinstance(faces, np.ndarray) and not np.issubdtype(faces.dtype, np.integer)
    ):
        raise TypeError(f"faces must hold integers, got dtype {faces.dtype}")
    f = to_numpy(faces, np.int64, "faces")
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must be (V, 3), got shape {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must be (F, 3) triangles, got shape {f.shape}")
    if len(f) == 0:
        raise ValueError("the mesh has no faces")
    if not np.isfinite(v).all():
        raise ValueError("vertices contain NaN or infinite values")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"faces index vertices outside [0, {len(v)}): min {f.min()}, max {f.max()}")
    return v, f


def flip_v(uvs: np.ndarray) -> np.ndarray:
    """Convert UVs between top-left origin (glTF) and bottom-left origin (Blender, trimesh, OpenGL)."""
    out = np.array(uvs, dtype=np.float32, copy=True)
    out[..., 1] = 1.0 - out[..., 1]
    return out


def unwrap(
    vertices: np.ndarray | torch.Tensor,
    faces: np.ndarray | torch.Tensor,
    config: UnwrapConfig | None = None,
) -> UVMesh:
    """UV-unwrap a triangle mesh with xatlas.

    vertices: (V, 3) float; faces: (F, 3) int. Returns a :class:`UVMesh` with the same
    faces in the same order (indices into the new, seam-split vertex array).
    Degenerate faces get zero-area UVs and so no texels.
    """
    import xatlas  # imported here: only the texture stage needs the extension

    cfg = config or UnwrapConfig()
    v, f = check_mesh(vertices, faces)
    chart = xatlas.ChartOptions()
    chart.max_iterations = cfg.max_iterations
    chart.max_cost = cfg.max_cost
    if cfg.max_boundary_rel > 0:
        p = v[f].astype(np.float64)
        area = 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1).sum()
        if area > 0:
            chart.max_boundary_length = float(cfg.max_boundary_rel * math.sqrt(area))
    pack = xatlas.PackOptions()
    pack.resolution = cfg.texture_size
    pack.padding = cfg.padding
    pack.bilinear = cfg.bilinear
    pack.blockAlign = cfg.block_align
    pack.rotate_charts = cfg.rotate_charts

    start = time.perf_counter()
    atlas = xatlas.Atlas()
    atlas.add_mesh(v, f.astype(np.uint32))
    atlas.generate(chart, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases; expected exactly one")
    vmapping, indices, uvs = atlas.get_mesh(0)
    elapsed = time.perf_counter() - start
    scale = max(atlas.width, atlas.height) / cfg.texture_size
    logger.info(
        "unwrap: %d faces -> %d charts, %d vertices, atlas %dx%d (utilization %.2f, "
        "effective padding %.1f texels) in %.2f s",
        len(f), atlas.chart_count, len(vmapping), atlas.width, atlas.height,
        atlas.utilization, cfg.padding / max(scale, 1e-9), elapsed,
    )
    if indices.shape != f.shape:
        raise RuntimeError(f"xatlas returned {indices.shape} faces for {f.shape} input faces")
    vmapping = vmapping.astype(np.int64)
    return UVMesh(vertices=v[vmapping], faces=indices.astype(np.int64), uvs=np.clip(uvs, 0.0, 1.0), vmapping=vmapping)


def uv_mesh_from_corner_uvs(
    vertices: np.ndarray | torch.Tensor,
    faces: np.ndarray | torch.Tensor,
    corner_uvs: np.ndarray | torch.Tensor,
) -> UVMesh:
    """Build a :class:`UVMesh` from per-corner UVs (F, 3, 2), as Blender stores them per loop.

    A vertex is split once per distinct UV it has among its corners (seams);
    UVs are taken as given (glTF convention), not flipped.
    """
    v, f = check_mesh(vertices, faces)
    cuv = to_numpy(corner_uvs, np.float32, "corner_uvs")
    if cuv.shape != (len(f), 3, 2):
        raise ValueError(f"corner_uvs must be (F, 3, 2) = ({len(f)}, 3, 2), got {cuv.shape}")
    # Key each corner by (vertex, exact uv bits) and keep the unique keys as new vertices.
    uv_bits = cuv.reshape(-1, 2).view(np.int32).astype(np.int64) & 0xFFFFFFFF
    keys = np.stack([f.reshape(-1), uv_bits[:, 0], uv_bits[:, 1]], axis=1)
    uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    vmapping = uniq[:, 0]
    return UVMesh(
        vertices=v[vmapping],
        faces=inverse.reshape(-1, 3),
        uvs=cuv.reshape(-1, 2)[first],
        vmapping=vmapping,
    )


def usable_uvs(uvs: np.ndarray, faces: np.ndarray, min_area: float = 1e-4, tol: float = 1e-4) -> bool:
    """Whether UVs can be baked onto: finite, inside [0, 1] (within ``tol``), and covering some area.

    uvs: (V, 2) per vertex (``faces`` index them) or (F, 3, 2) per corner. Overlapping
    (mirrored or stacked) charts are allowed; they receive one colour per texel.
    """
    uvs = np.asarray(uvs, dtype=np.float64)
    faces = np.asarray(faces)
    tri = uvs if uvs.ndim == 3 else uvs[faces]
    if tri.size == 0 or not np.isfinite(tri).all():
        return False
    if tri.min() < -tol or tri.max() > 1.0 + tol:
        return False
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum()
    return bool(area >= min_area and math.isfinite(area))
