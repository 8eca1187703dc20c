"""Shape and colour measures of a generated mesh, used by tests and tuning of the pipelines.

A primitive's measures (on a clean, closed mesh; the object's vertical axis is Z):
  sphericity    pi^(1/3) (6 V)^(2/3) / A: sphere 1.0, cylinder (h = d) 0.87, cube 0.81, cone ~0.7;
  fill          V / (bounding-box volume): cube 1.0, cylinder 0.79, sphere 0.52, cone 0.26;
  taper         mean width of the top fifth over the bottom fifth of the height: cube,
                cylinder ~1, sphere ~1 (symmetric), cone ~0.2;
  extent_ratio  smallest over largest bounding-box side;
  roundness     horizontal cross-section at mid-height: area / (pi r_max^2) around its centroid:
                circle (sphere, cylinder, cone) 1.0, square (cube) 0.64, any rotation about Z;
  genus         handles of the largest piece: torus 1, every other solid 0.
"""
from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)


def sphericity(vertices: np.ndarray, faces: np.ndarray) -> float:
    """pi^(1/3) (6 V)^(2/3) / A: 1 for a sphere, about 0.806 for a cube (closed meshes)."""
    from engine_server.geometry import mesh_stats

    stats = mesh_stats(vertices, faces)
    if stats.area <= 0:
        return 0.0
    return float(math.pi ** (1.0 / 3.0) * (6.0 * abs(stats.signed_volume)) ** (2.0 / 3.0) / stats.area)


def shape_measures(vertices: np.ndarray, faces: np.ndarray) -> dict[str, float]:
    """vertices (V, 3), faces (F, 3) -> sphericity, fill, taper, extent_ratio, watertight, components."""
    import trimesh

    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces), process=True)
    parts = mesh.split(only_watertight=False)
    main = max(parts, key=lambda m: m.area) if len(parts) else mesh
    volume, area = abs(float(main.volume)), float(main.area)
    extent = main.extents
    fill = volume / max(float(np.prod(extent)), 1e-12)
    z = main.vertices[:, 2]
    lo, hi = float(z.min()), float(z.max())
    h = max(hi - lo, 1e-12)

    def width(mask: np.ndarray) -> float:
        xy = main.vertices[mask][:, :2]
        return float((xy.max(0) - xy.min(0)).mean()) if len(xy) > 2 else 0.0

    taper = width(z > hi - 0.2 * h) / max(width(z < lo + 0.2 * h), 1e-12)
    roundness = _section_roundness(main, 0.5 * (lo + hi))
    # Boundary edges (used by exactly one face) over all edges: 0 for a closed surface.
    edges = np.sort(main.edges, axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    open_fraction = float((counts == 1).sum()) / max(len(counts), 1)
    return {
        "sphericity": sphericity(main.vertices, main.faces),
        "fill": fill,
        "taper": taper,
        "roundness": roundness,
        "extent_ratio": float(extent.min() / max(extent.max(), 1e-12)),
        "open_edge_fraction": open_fraction,
        "components": float(len(parts)),
        "main_area_fraction": area / max(float(mesh.area), 1e-12),
    }


def _section_roundness(mesh, z: float, band: float = 0.05) -> float:
    """Convex area / (pi r_max^2) of the mesh's vertices within ``band`` x height of z, seen from above."""
    from scipy.spatial import ConvexHull, QhullError

    v = np.asarray(mesh.vertices)
    h = float(np.ptp(v[:, 2])) or 1.0
    xy = v[np.abs(v[:, 2] - z) <= band * h][:, :2]
    if len(xy) < 3:
        return 0.0
    try:
        hull = ConvexHull(xy)
    except QhullError:
        return 0.0
    ring = xy[hull.vertices]
    # Centroid of the hull polygon (shoelace), then its farthest corner.
    x, y = ring[:, 0], ring[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = 0.5 * cross.sum()
    centre = np.array([((x + np.roll(x, -1)) * cross).sum(), ((y + np.roll(y, -1)) * cross).sum()]) / (6 * area)
    r_max = float(np.linalg.norm(ring - centre, axis=1).max())
    return float(abs(area) / (math.pi * r_max**2)) if r_max > 0 else 0.0


def genus(vertices: np.ndarray, faces: np.ndarray) -> int:
    """Handles of the largest piece (by area) once vertices at one position (UV seams) are merged.

    From its Euler characteristic: V - E + F = 2 - 2 g - b, with b the boundary loops (0 when closed).
    """
    import trimesh
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces), process=True)
    parts = mesh.split(only_watertight=False)
    main = max(parts, key=lambda m: m.area) if len(parts) else mesh
    edges = np.sort(main.edges, axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    boundary = unique[counts == 1]
    loops = 0
    if len(boundary):
        nodes, idx = np.unique(boundary, return_inverse=True)
        idx = idx.reshape(-1, 2)
        graph = coo_matrix((np.ones(len(idx)), (idx[:, 0], idx[:, 1])), shape=(len(nodes), len(nodes)))
        loops = connected_components(graph, directed=False)[0]
    euler = len(main.vertices) - len(unique) + len(main.faces)
    return int(round((2 - euler - loops) / 2))


def dominant_color(texture: np.ndarray, uvs: np.ndarray | None = None, faces: np.ndarray | None = None) -> np.ndarray:
    """The median colour (3,) in [0, 1] of a texture's used texels (those under the mesh's UV triangles).

    Without uvs/faces, every texel that is not pure black (unused atlas space) counts.
    """
    tex = np.asarray(texture, dtype=np.float64)[..., :3] / 255.0
    if uvs is not None and faces is not None:
        size = tex.shape[0]
        # Sample texels at the centroids of the UV triangles (glTF UVs: v points down the image).
        centroids = np.asarray(uvs)[np.asarray(faces)].mean(axis=1)
        px = np.clip((centroids[:, 0] * size).astype(int), 0, size - 1)
        py = np.clip((centroids[:, 1] * size).astype(int), 0, size - 1)
        return np.median(tex[py, px], axis=0)
    used = tex.reshape(-1, 3)
    used = used[used.sum(1) > 1e-3]
    return np.median(used, axis=0) if len(used) else np.zeros(3)


DRAFT_PROMPTS = {"cube": "a red cube", "sphere": "a blue sphere", "cylinder": "a green cylinder", "cone": "a yellow cone"}
"""The draft's shape-quality prompts: four shapes told apart by the measures of :func:`draft_shape_checks`."""


def draft_shape_checks(m: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The shape-quality bars the draft's four prompts must clear, from their measures (shape -> measures).

    The tests and ``engine-server bench draft`` read the same bars. Ideal values: sphericity sphere 1.0,
    cylinder 0.87, cube 0.81; fill sphere 0.52, cylinder 0.79, cube 1.0; taper cone ~0.2, others ~1;
    extent ratio cube and sphere 1.0, the bundled cylinder 0.8 (diameter 0.8 of its height).
    """
    return {
        "sphere roundest": m["sphere"]["sphericity"] > max(m["cube"]["sphericity"], m["cylinder"]["sphericity"]) + 0.02,
        "sphere fills its box least": m["sphere"]["fill"] < min(m["cube"]["fill"], m["cylinder"]["fill"]),
        "cone narrows upwards": m["cone"]["taper"] < min(m[s]["taper"] for s in ("cube", "cylinder", "sphere")) - 0.05,
        "cube as wide as tall": m["cube"]["extent_ratio"] > 0.88,
        "cylinder taller than wide": m["cylinder"]["extent_ratio"] < m["cube"]["extent_ratio"] - 0.1,
        "one closed piece": all(x["main_area_fraction"] > 0.97 and x["open_edge_fraction"] < 0.01 for x in m.values()),
    }


def colour_word(texture: np.ndarray, uvs: np.ndarray, faces: np.ndarray) -> str:
    """The bundled vocabulary's colour word of the texture's dominant colour, by the prior's own evaluation rule
    (black by value, white by saturation, else the nearest hue): a darker or paler shade keeps its word, where the
    nearest anchor colour would call a dark yellow (0.71, 0.67, 0.06) orange."""
    import torch

    from engine_server.models.bundled.evaluate import classify_color

    colour = torch.as_tensor(dominant_color(texture, uvs, faces), dtype=torch.float32)
    return classify_color(colour[:, None, None].expand(3, 3, 3), torch.ones(3, 3, dtype=torch.bool))
