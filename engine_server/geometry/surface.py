"""Asset-grade surfaces: feature-preserving smoothing of an extraction and decimation to a face count.

:func:`smooth_surface` is bilateral normal filtering (Zheng et al. 2011, "Bilateral Normal
Filtering for Mesh Denoising"): face normals are averaged with their neighbours, weighted
by distance and by how much the normals already agree, so small bumps (neighbours within
a few degrees) melt while a cube's edges (90 degrees apart) keep their faces apart; the
vertices are then moved to fit the filtered normals (Sun et al. 2007), which keeps flat
faces flat and moves vertices only along normals (little shrinkage, unlike plain
Laplacian smoothing). :func:`decimate` is quadric edge collapse through fast-simplification
(the library trimesh calls), capped at the requested face count and checked to stay
closed when its input was.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from engine_server.geometry.mesh_utils import clean_mesh, mesh_stats
from engine_server.export import smooth_normals

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothConfig:
    """How :func:`smooth_surface` filters a surface."""

    normal_iterations: int = 8
    """Rounds of bilateral filtering of the face normals."""
    vertex_iterations: int = 12
    """Rounds of moving the vertices towards the planes of the filtered normals."""
    sigma_normal: float = 0.35
    """Width of the normal-agreement weight, in |n_i - n_j| (0.35: about 20 degrees; edges of 60+ degrees are kept)."""

    def __post_init__(self) -> None:
        if self.normal_iterations < 0 or self.vertex_iterations < 0:
            raise ValueError(f"SmoothConfig iterations must be >= 0, got normal_iterations={self.normal_iterations}, "
                             f"vertex_iterations={self.vertex_iterations}")
        if not self.sigma_normal > 0:
            raise ValueError(f"SmoothConfig.sigma_normal must be > 0, got {self.sigma_normal}")


def _face_geometry(v: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit normals (F, 3), areas (F,) and centroids (F, 3)."""
    cross = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    length = np.linalg.norm(cross, axis=1)
    normals = cross / np.maximum(length, 1e-30)[:, None]
    return normals, 0.5 * length, v[f].mean(1)


def smooth_surface(vertices: np.ndarray, faces: np.ndarray, config: SmoothConfig | None = None) -> np.ndarray:
    """Feature-preserving smoothing: new (V, 3) float32 positions for ``faces`` (F, 3), topology unchanged.

    Neighbours of a face are the faces sharing a vertex with it. Unreferenced vertices stay put.
    """
    cfg = config or SmoothConfig()
    v = np.asarray(vertices, dtype=np.float64).copy()
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"smooth_surface needs vertices (V, 3) and faces (F, 3), got {v.shape} and {f.shape}")
    if len(f) == 0:
        return v.astype(np.float32)
    n_faces = len(f)
    # Vertex-face incidence (V, F); face-face "shares a vertex" pairs from it.
    incidence = sp.csr_matrix((np.ones(3 * n_faces), (f.reshape(-1), np.repeat(np.arange(n_faces), 3))),
                              shape=(len(v), n_faces))
    adjacency = (incidence.T @ incidence).tocoo()
    rows, cols = adjacency.row, adjacency.col
    normals, areas, centroids = _face_geometry(v, f)
    # Spatial width: the mean distance between neighbouring centroids (scale-free).
    sigma_s = max(float(np.linalg.norm(centroids[rows] - centroids[cols], axis=1).mean()), 1e-12)
    spatial = np.exp(-np.sum((centroids[rows] - centroids[cols]) ** 2, axis=1) / (2 * sigma_s**2)) * areas[cols]
    filtered = normals
    for _ in range(cfg.normal_iterations):
        agree = np.exp(-np.sum((filtered[rows] - filtered[cols]) ** 2, axis=1) / (2 * cfg.sigma_normal**2))
        w = sp.csr_matrix((spatial * agree, (rows, cols)), shape=(n_faces, n_faces))
        filtered = w @ filtered
        filtered /= np.maximum(np.linalg.norm(filtered, axis=1, keepdims=True), 1e-30)
    # Vertex update: each vertex moves by the mean over its faces of the offset onto that face's
    # filtered plane (through the face's current centroid).
    valence = np.asarray(incidence.sum(1)).ravel()
    used = valence > 0
    for _ in range(cfg.vertex_iterations):
        centroids = v[f].mean(1)
        corner = v[f]  # (F, 3, 3)
        offset = np.einsum("fk,fck->fc", filtered, centroids[:, None, :] - corner)  # (F, 3) along the normal
        move = np.zeros_like(v)
        for k in range(3):
            np.add.at(move, f[:, k], filtered * offset[:, k:k + 1])
        v[used] += move[used] / valence[used, None]
    return _untangle(v, f, filtered, incidence).astype(np.float32)


def _untangle(v: np.ndarray, f: np.ndarray, target: np.ndarray, incidence: sp.csr_matrix, rounds: int = 10
              ) -> np.ndarray:
    """Relax the vertices of faces folded against their filtered normal (sliver triangles of an extraction
    can flip in the vertex update): a few uniform-Laplacian steps on those vertices only."""
    adjacency = (incidence @ incidence.T).tocsr()
    adjacency.setdiag(0)
    adjacency.eliminate_zeros()
    degree = np.maximum(np.asarray(adjacency.sum(1)).ravel(), 1.0)
    for _ in range(rounds):
        normals = _face_geometry(v, f)[0]
        folded = np.einsum("ij,ij->i", normals, target) < 0.5  # more than 60 degrees off
        if not folded.any():
            break
        moving = np.unique(f[folded])
        mean = (adjacency @ v) / degree[:, None]
        v[moving] = 0.5 * v[moving] + 0.5 * mean[moving]
    return v


def decimate(vertices: np.ndarray, faces: np.ndarray, max_faces: int, aggressiveness: float = 3.5
             ) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation to at most ``max_faces`` triangles: (V', 3) float32, (F', 3) int64.

    A mesh already within the budget comes back cleaned but not simplified. ``aggressiveness``
    is fast-simplification's ``agg``: 3.5 gave evener triangles (lower dihedral ratios) than its
    default 7 on extracted spheres and cubes at the same speed. A closed (watertight) input stays
    closed where it can: an open result is retried with other settings and, failing that, its holes
    are filled; a spiky surface that none of that closes within the budget comes back open, with a
    warning (the job keeps its result; the sidecar's ``asset.closed`` says so). A RuntimeError only
    when no setting reaches the budget at all.
    """
    import fast_simplification
    import trimesh

    if max_faces < 4:
        raise ValueError(f"the face-count target must be >= 4 (a tetrahedron), got {max_faces}")
    v, f = clean_mesh(vertices, faces, min_component_fraction=0.0)
    if len(f) <= max_faces:
        return v, f
    closed = mesh_stats(v, f).is_watertight
    open_result = None
    for agg in (aggressiveness, 0.6 * aggressiveness, max(2.0 * aggressiveness, 7.0)):  # 7: the library default
        out_v, out_f = v, f
        target = max_faces
        for _ in range(6):  # the library stops near the target, sometimes above it: tighten until the cap holds
            out_v, out_f = fast_simplification.simplify(out_v.astype(np.float64), out_f.astype(np.int32),
                                                        target_count=target, agg=agg)
            out_v, out_f = clean_mesh(out_v, out_f, min_component_fraction=0.0)
            if len(out_f) <= max_faces:
                break
            target = max(4, target - (len(out_f) - max_faces) - 2)
        if len(out_f) > max_faces:
            logger.info("decimate: aggressiveness %.1f stopped at %d faces, above %d", agg, len(out_f), max_faces)
            continue
        if not closed or mesh_stats(out_v, out_f).is_watertight:
            return out_v, out_f
        open_result = open_result or (out_v, out_f)
        logger.info("decimate: the result at aggressiveness %.1f is open; retrying", agg)
    if open_result is not None:
        mesh = trimesh.Trimesh(*open_result, process=False)
        trimesh.repair.fill_holes(mesh)
        if mesh.is_watertight and len(mesh.faces) <= max_faces:
            return np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int64)
        logger.warning("decimating %d faces to at most %d left holes that could not be filled; the mesh is open "
                       "(more faces may keep it closed)", len(f), max_faces)
        return open_result
    raise RuntimeError(f"decimating {len(f)} faces could not reach at most {max_faces}; ask for more faces")


class SurfaceProjector:
    """Closest points on a triangle mesh and its smooth (vertex-interpolated) normal there.

    Used to bake from the full-resolution surface onto a decimated one: every texel's point
    on the low mesh is moved to the nearest point of the high mesh. Candidates are the
    faces with the ``candidates`` nearest centroids, exact point-triangle distances pick one.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, candidates: int = 6) -> None:
        from scipy.spatial import cKDTree

        v = np.asarray(vertices, dtype=np.float64)
        f = np.asarray(faces, dtype=np.int64)
        if len(f) == 0:
            raise ValueError("SurfaceProjector needs a mesh with faces")
        self.tri = torch.as_tensor(v[f], dtype=torch.float32)  # (F, 3, 3)
        self.corner_normals = torch.as_tensor(smooth_normals(v, f)[f], dtype=torch.float32)  # (F, 3, 3)
        self.tree = cKDTree(v[f].mean(1))
        self.candidates = min(candidates, len(f))

    def project(self, points: torch.Tensor, chunk: int = 262_144) -> tuple[torch.Tensor, torch.Tensor]:
        """points (N, 3) -> nearest surface points (N, 3) and unit normals there (N, 3), float32 on points' device."""
        from engine_server.geometry.mesh_sdf import closest_point_on_triangles

        dev = points.device
        q_all = points.detach().to("cpu", torch.float32)
        out_p = torch.empty_like(q_all)
        out_n = torch.empty_like(q_all)
        k = self.candidates
        for s in range(0, len(q_all), chunk):
            q = q_all[s:s + chunk]
            cand = self.tree.query(q.numpy(), k=k, workers=-1)[1].reshape(len(q), k)
            cand = torch.as_tensor(cand)
            tri = self.tri[cand]  # (n, k, 3, 3)
            closest = closest_point_on_triangles(q[:, None].expand(-1, k, -1), tri)
            best = (closest - q[:, None]).norm(dim=-1).argmin(1)
            rows = torch.arange(len(q))
            p = closest[rows, best]
            t = tri[rows, best]
            bary = _barycentric3(p, t)
            n = (bary[:, :, None] * self.corner_normals[cand[rows, best]]).sum(1)
            out_p[s:s + chunk] = p
            out_n[s:s + chunk] = torch.nn.functional.normalize(n, dim=1, eps=1e-12)
        return out_p.to(dev), out_n.to(dev)


def _barycentric3(p: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """(N, 3) clamped barycentric weights of points p (N, 3) lying on triangles tri (N, 3, 3)."""
    e0, e1, d = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], p - tri[:, 0]
    d00, d01, d11 = (e0 * e0).sum(1), (e0 * e1).sum(1), (e1 * e1).sum(1)
    d20, d21 = (d * e0).sum(1), (d * e1).sum(1)
    den = (d00 * d11 - d01 * d01).clamp(min=1e-30)
    b1 = (d11 * d20 - d01 * d21) / den
    b2 = (d00 * d21 - d01 * d20) / den
    w = torch.stack([1.0 - b1 - b2, b1, b2], dim=1).clamp(min=0.0)
    return w / w.sum(1, keepdim=True).clamp(min=1e-12)
