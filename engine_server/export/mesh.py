"""The in-memory description every writer exports (:class:`TexturedMesh`), its checks, and the sidecar.

No torch import (tensors are accepted all the same) and no writer's library: gltf.py,
obj.py and usd.py each import theirs.
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from engine_server.wire.files import atomic_write

if TYPE_CHECKING:  # torch tensors are accepted, but this module does not need torch to run
    import torch

logger = logging.getLogger(__name__)


@dataclass
class MaterialParams:
    """Metallic-roughness material factors written beside the base-colour texture."""

    metallic: float = 0.0
    """metallicFactor in [0, 1]; baked albedo from a field is dielectric."""
    roughness: float = 0.85
    """roughnessFactor in [0, 1]."""
    base_color_factor: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    """Linear RGBA multiplier of the texture; keep white so the texture shows as baked."""
    double_sided: bool = False
    """Render back faces too (generated meshes are closed and outward-facing)."""

    def __post_init__(self) -> None:
        for name in ("metallic", "roughness"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MaterialParams.{name} must be in [0, 1], got {value}")
        if len(self.base_color_factor) != 4 or not all(0.0 <= c <= 1.0 for c in self.base_color_factor):
            raise ValueError(f"MaterialParams.base_color_factor must be 4 values in [0, 1], got {self.base_color_factor}")


@dataclass
class TexturedMesh:
    """The one in-memory result every exporter writes: geometry, UVs, maps and material factors.

    Pipelines build it once; :func:`engine_server.export.export_mesh` writes it as GLB, OBJ or
    USD from the same values.
    """

    vertices: np.ndarray
    """(V, 3) float32, engine (Blender, Z-up) coordinates."""
    faces: np.ndarray
    """(F, 3) int64 vertex indices, counter-clockwise seen from outside."""
    uvs: np.ndarray
    """(V, 2) float32, glTF convention (top-left origin)."""
    base_color: np.ndarray
    """(S, S, 3|4) uint8 sRGB base colour, row 0 = top."""
    normal_map: np.ndarray | None = None
    """(S, S, 3) uint8 tangent-space normal map (MikkTSpace, glTF / OpenGL convention: +Y green up), or None."""
    material: MaterialParams = field(default_factory=MaterialParams)
    """Metallic / roughness factors."""
    normals: np.ndarray | None = None
    """(V, 3) engine-space unit vertex normals, or None for :func:`smooth_normals`."""


class CheckedMesh(NamedTuple):
    """A :class:`TexturedMesh` checked and converted to plain numpy (what the writers read)."""

    vertices: np.ndarray
    """(V, 3) float64, engine coordinates."""
    faces: np.ndarray
    """(F, 3) int64."""
    uvs: np.ndarray
    """(V, 2) float32, glTF convention."""
    base_color: np.ndarray
    """(H, W, 3|4) uint8, row 0 = top."""
    normal_map: np.ndarray | None
    """(H, W, 3) uint8 or None."""
    normals: np.ndarray
    """(V, 3) float64 unit normals, engine coordinates."""
    material: MaterialParams


def smooth_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) unit vertex normals: area-weighted face normals summed over all vertices at one position.

    Vertices duplicated along UV seams therefore share a normal. A vertex touching only
    degenerate faces (or none) gets +Z, so every normal is unit length.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    face_n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # (F, 3), length = 2 * area
    _, group = np.unique(v, axis=0, return_inverse=True)
    group = group.reshape(-1)
    acc = np.zeros((group.max() + 1, 3))
    for k in range(3):
        np.add.at(acc, group[f[:, k]], face_n)
    n = acc[group]
    length = np.linalg.norm(n, axis=1, keepdims=True)
    bad = length[:, 0] <= 1e-20
    n = np.where(bad[:, None], np.array([0.0, 0.0, 1.0]), n / np.where(bad[:, None], 1.0, length))
    return n


def _plain(x: object) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor (any device) or nested sequence."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_array(x: np.ndarray | torch.Tensor, dtype: type, name: str) -> np.ndarray:
    try:
        return np.ascontiguousarray(_plain(x), dtype=dtype)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric array or tensor: {err}") from err


def _image(x: np.ndarray | torch.Tensor, name: str, channels: tuple[int, ...]) -> np.ndarray:
    raw = _plain(x)
    if raw.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 (H, W, {'|'.join(map(str, channels))}), got dtype {raw.dtype}")
    if raw.ndim != 3 or raw.shape[2] not in channels or raw.shape[0] < 1 or raw.shape[1] < 1:
        shapes = " or ".join(f"(H, W, {c})" for c in channels)
        raise ValueError(f"{name} must be {shapes}, got {raw.shape}")
    return np.ascontiguousarray(raw)


def check_mesh(mesh: TexturedMesh) -> CheckedMesh:
    """``mesh`` checked (shapes, dtypes, index range, finite values) as plain numpy; errors name the field."""
    v = _as_array(mesh.vertices, np.float64, "vertices")
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"vertices must be (V, 3) with V > 0, got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("vertices contain NaN or infinite values")
    f_raw = _plain(mesh.faces)
    if not np.issubdtype(f_raw.dtype, np.integer):
        raise TypeError(f"faces must hold integers, got dtype {f_raw.dtype}")
    f = np.ascontiguousarray(f_raw, dtype=np.int64)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"faces must be (F, 3) triangles with F > 0, got {f.shape}")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"faces index vertices outside [0, {len(v)}): min {f.min()}, max {f.max()}")
    if len(v) > np.iinfo(np.uint32).max:
        raise ValueError(f"too many vertices for uint32 indices: {len(v)}")
    uv = _as_array(mesh.uvs, np.float32, "uvs")
    if uv.shape != (len(v), 2):
        raise ValueError(f"uvs must be (V, 2) = ({len(v)}, 2), one per vertex, got {uv.shape}")
    if not np.isfinite(uv).all():
        raise ValueError("uvs contain NaN or infinite values")
    base = _image(mesh.base_color, "base_color", (3, 4))
    normal_map = None if mesh.normal_map is None else _image(mesh.normal_map, "normal_map", (3,))
    if mesh.normals is None:
        n = smooth_normals(v, f)
    else:
        n = _as_array(mesh.normals, np.float64, "normals")
        if n.shape != v.shape or not np.isfinite(n).all():
            raise ValueError(f"normals must be finite and (V, 3) = {v.shape}, got {n.shape}")
        length = np.linalg.norm(n, axis=1, keepdims=True)
        if (length < 1e-12).any():
            raise ValueError("normals contain zero-length vectors")
        n = n / length
    if not isinstance(mesh.material, MaterialParams):
        raise TypeError(f"material must be MaterialParams, got {type(mesh.material).__name__}")
    return CheckedMesh(v, f, uv, base, normal_map, n, mesh.material)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3|4) uint8, row 0 = top -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, "PNG")
    return buf.getvalue()


def texture_names(stem: str, has_normal_map: bool) -> dict[str, str]:
    """File names of the images an OBJ or USD file refers to: ``<stem>_basecolor.png`` (+ ``<stem>_normal.png``)."""
    names = {"base_color": f"{stem}_basecolor.png"}
    if has_normal_map:
        names["normal_map"] = f"{stem}_normal.png"
    return names


def flip_v(uv: np.ndarray) -> np.ndarray:
    """glTF UVs (top-left origin) <-> bottom-left origin (OBJ ``vt``, USD ``st``, trimesh): v -> 1 - v."""
    out = np.array(uv, dtype=np.float64, copy=True)
    out[:, 1] = 1.0 - out[:, 1]
    return out


# ----------------------------------------------------------------------------- sidecar


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where an export writes its sidecar: ``<stem>.json`` beside the file (``model.glb`` -> ``model.json``)."""
    return Path(path).with_suffix(".json")


def sidecar_text(sidecar: dict, out: Path, fmt: str, m: CheckedMesh) -> str:
    """The sidecar's JSON: the caller's dict plus a ``"mesh"`` entry; raises before anything is written when the
    dict is not JSON-serializable. :func:`write_sidecar` adds the files' sizes once they exist."""
    if not isinstance(sidecar, dict):
        raise TypeError(f"sidecar must be a dict, got {type(sidecar).__name__}")
    meta = dict(sidecar)
    if "mesh" in meta:
        logger.warning("sidecar key 'mesh' is reserved for mesh statistics; the given value is replaced")
    meta["mesh"] = {
        "file": out.name,
        "format": fmt,
        "vertices": int(len(m.vertices)),
        "faces": int(len(m.faces)),
        "texture_size": [int(m.base_color.shape[1]), int(m.base_color.shape[0])],
        "texture_channels": int(m.base_color.shape[2]),
        "normal_map": m.normal_map is not None,
        "metallic": float(m.material.metallic),
        "roughness": float(m.material.roughness),
        "bounds_min": [float(x) for x in m.vertices.min(0)],
        "bounds_max": [float(x) for x in m.vertices.max(0)],
        "coordinates": _COORDINATES[fmt],
        "uv_origin": "top-left (glTF)",
    }
    try:
        return json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"sidecar must be JSON-serializable: {err}") from err


_COORDINATES = {
    "glb": "engine/Blender Z-up; the GLB is glTF Y-up: (x, y, z) -> (x, z, -y)",
    "obj": "engine/Blender Z-up; the OBJ is Y-up as OBJ readers assume: (x, y, z) -> (x, z, -y)",
    "usd": "engine/Blender Z-up; the USD stage is Z-up too (upAxis Z, metersPerUnit 1)",
    "usdz": "engine/Blender Z-up; the USD stage is Z-up too (upAxis Z, metersPerUnit 1)",
}


def write_sidecar(out: Path, text: str, files: list[Path], seconds: float) -> None:
    """Write ``<stem>.json`` with the sizes of the written ``files`` and the export time patched in."""
    meta = json.loads(text)
    meta["mesh"]["files"] = {p.name: p.stat().st_size for p in files}
    meta["mesh"]["export_seconds"] = round(seconds, 4)
    atomic_write(sidecar_path(out), (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode("utf-8"))
