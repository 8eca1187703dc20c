"""Export a textured mesh as a binary glTF (GLB) with a JSON sidecar, and load one back.

Coordinates: the engine works in Blender's world (right-handed, **Z up**); glTF is
right-handed **Y up**. :func:`export_glb` writes an engine point ``(x, y, z)`` as the
glTF point ``(x, z, -y)`` (a rotation of -90 degrees about X, so triangle winding is
kept), which is exactly the inverse of what Blender's glTF importer applies
(glTF ``(X, Y, Z)`` -> Blender ``(X, -Z, Y)``): the object imports upright, each
vertex at its engine coordinates. :func:`load_glb` applies the inverse, so a round
trip returns engine coordinates. :func:`engine_to_gltf` / :func:`gltf_to_engine`
expose the two maps.

UVs are given and returned in glTF's convention ((0, 0) is the image's top-left,
see :mod:`engine_server.texture.unwrap`) and are written to ``TEXCOORD_0`` unchanged.
(trimesh stores UVs with a bottom-left origin and flips them on export and import;
this module hides that.)

The GLB holds one node and one mesh named ``name``, with float32 positions, unit
float32 normals (smooth: averaged over all vertices sharing a position, so UV seams
do not show as shading seams), float32 ``TEXCOORD_0``, uint32 indices, and a
metallic-roughness material whose ``baseColorTexture`` is the texture as a PNG
(sRGB, as glTF specifies), sampled with mipmapped linear filtering and
clamp-to-edge wrapping.

This module does not import torch (it accepts tensors all the same).

Sidecar: ``<stem>.json`` beside ``<stem>.glb`` (``model.glb`` -> ``model.json``):
the caller's dict (prompt, seed, preset, model, guidance, timings ...) plus a
``"mesh"`` entry written here (counts, bounds in engine coordinates, texture size,
file size, the coordinate convention). Both files are written atomically (a
temporary file in the same directory, then ``os.replace``), the GLB first.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from engine_server.wire.files import atomic_write

if TYPE_CHECKING:  # torch tensors are accepted, but this module does not need torch to run
    import torch

logger = logging.getLogger(__name__)

# glTF enums
_ARRAY_BUFFER = 34962
_ELEMENT_ARRAY_BUFFER = 34963
_LINEAR = 9729
_LINEAR_MIPMAP_LINEAR = 9987
_CLAMP_TO_EDGE = 33071

ENGINE_TO_GLTF = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
"""(3, 3) rotation taking engine (Blender, Z-up) coordinates to glTF (Y-up): (x, y, z) -> (x, z, -y)."""


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

    Pipelines build it once; :func:`export_mesh` writes it as GLB, OBJ or USD from the same values.
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


def export_mesh(path: str | os.PathLike[str], mesh: TexturedMesh, name: str = "generated",
                sidecar: dict | None = None) -> Path:
    """Write ``mesh`` in the format its path's extension names; returns the path.

    ``.glb`` today (OBJ and USD follow).
    """
    out = Path(path)
    if out.suffix.lower() == ".glb":
        return export_glb(out, mesh.vertices, mesh.faces, mesh.uvs, mesh.base_color, material=mesh.material,
                          name=name, sidecar=sidecar, normals=mesh.normals)
    raise ValueError(f"cannot export {out}: the extension must be .glb")


class LoadedGLB(NamedTuple):
    """A mesh read back by :func:`load_glb` (engine coordinates, glTF UVs)."""

    vertices: np.ndarray
    """(V, 3) float32 positions, engine (Z-up) coordinates."""
    faces: np.ndarray
    """(F, 3) int64 vertex indices."""
    uvs: np.ndarray | None
    """(V, 2) float32 UVs, glTF convention (top-left origin), or None."""
    texture: np.ndarray | None
    """(H, W, 3 or 4) uint8 base-colour image (row 0 = top), or None."""


def engine_to_gltf(points: np.ndarray) -> np.ndarray:
    """Engine (Blender, Z-up) points or directions (..., 3) -> glTF (Y-up): (x, y, z) -> (x, z, -y)."""
    p = np.asarray(points)
    return np.stack([p[..., 0], p[..., 2], -p[..., 1]], axis=-1)


def gltf_to_engine(points: np.ndarray) -> np.ndarray:
    """glTF (Y-up) points or directions (..., 3) -> engine (Z-up): (x, y, z) -> (x, -z, y)."""
    p = np.asarray(points)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], axis=-1)


def sidecar_path(glb_path: str | os.PathLike[str]) -> Path:
    """Where :func:`export_glb` writes the sidecar of ``glb_path``: ``<stem>.json`` beside it."""
    return Path(glb_path).with_suffix(".json")


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


def _check_inputs(
    vertices: np.ndarray | torch.Tensor,
    faces: np.ndarray | torch.Tensor,
    uvs: np.ndarray | torch.Tensor,
    texture: np.ndarray | torch.Tensor,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    v = _as_array(vertices, np.float64, "vertices")
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"vertices must be (V, 3) with V > 0, got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("vertices contain NaN or infinite values")
    f_raw = _plain(faces)
    if not np.issubdtype(f_raw.dtype, np.integer):
        raise TypeError(f"faces must hold integers, got dtype {f_raw.dtype}")
    f = np.ascontiguousarray(f_raw, dtype=np.int64)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"faces must be (F, 3) triangles with F > 0, got {f.shape}")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"faces index vertices outside [0, {len(v)}): min {f.min()}, max {f.max()}")
    if len(v) > np.iinfo(np.uint32).max:
        raise ValueError(f"too many vertices for uint32 indices: {len(v)}")
    uv = _as_array(uvs, np.float32, "uvs")
    if uv.shape != (len(v), 2):
        raise ValueError(f"uvs must be (V, 2) = ({len(v)}, 2), one per vertex, got {uv.shape}")
    if not np.isfinite(uv).all():
        raise ValueError("uvs contain NaN or infinite values")
    tex_raw = _plain(texture)
    if tex_raw.dtype != np.uint8:
        raise TypeError(f"texture must be uint8 (H, W, 3|4), got dtype {tex_raw.dtype}")
    if tex_raw.ndim != 3 or tex_raw.shape[2] not in (3, 4) or tex_raw.shape[0] < 1 or tex_raw.shape[1] < 1:
        raise ValueError(f"texture must be (H, W, 3) or (H, W, 4), got {tex_raw.shape}")
    return v, f, uv, np.ascontiguousarray(tex_raw)


def _postprocess_tree(tree: dict, name: str) -> None:
    """Fill in what trimesh leaves out: bufferView targets, a texture sampler, names, generator."""
    from engine_server import __version__

    tree.setdefault("asset", {})["generator"] = f"engine-server {__version__} (trimesh)"
    views = tree.get("bufferViews", [])
    accessors = tree.get("accessors", [])
    for mesh in tree.get("meshes", []):
        for prim in mesh.get("primitives", []):
            for acc in prim.get("attributes", {}).values():
                views[accessors[acc]["bufferView"]]["target"] = _ARRAY_BUFFER
            if "indices" in prim:
                views[accessors[prim["indices"]]["bufferView"]]["target"] = _ELEMENT_ARRAY_BUFFER
    if tree.get("textures"):
        tree["samplers"] = [
            {"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}
        ]
        for tex in tree["textures"]:
            tex["sampler"] = 0
    for mat in tree.get("materials", []):
        mat["name"] = f"{name}_material"
    for mesh in tree.get("meshes", []):
        mesh.pop("extras", None)


def export_glb(
    path: str | os.PathLike[str],
    vertices: np.ndarray | torch.Tensor,
    faces: np.ndarray | torch.Tensor,
    uvs: np.ndarray | torch.Tensor,
    texture: np.ndarray | torch.Tensor,
    material: MaterialParams | None = None,
    name: str = "generated",
    sidecar: dict | None = None,
    normals: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write a textured triangle mesh to ``path`` (must end in ``.glb``); returns the path.

    vertices: (V, 3) engine (Z-up) coordinates; faces: (F, 3) int; uvs: (V, 2) glTF
    convention; texture: (H, W, 3|4) uint8, row 0 = top; normals: optional (V, 3)
    engine-space vertex normals (default :func:`smooth_normals`). With ``sidecar``
    (a JSON-serializable dict) also writes :func:`sidecar_path` (``<stem>.json``).
    """
    import trimesh
    from PIL import Image

    start = time.perf_counter()
    out = Path(path)
    if out.suffix.lower() != ".glb":
        raise ValueError(f"export path must end in .glb, got {out}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the directory for {out} does not exist")
    mat = material or MaterialParams()
    v, f, uv, tex = _check_inputs(vertices, faces, uvs, texture)
    if normals is None:
        n = smooth_normals(v, f)
    else:
        n = _as_array(normals, np.float64, "normals")
        if n.shape != v.shape or not np.isfinite(n).all():
            raise ValueError(f"normals must be finite and (V, 3) = {v.shape}, got {n.shape}")
        length = np.linalg.norm(n, axis=1, keepdims=True)
        if (length < 1e-12).any():
            raise ValueError("normals contain zero-length vectors")
        n = n / length
    sidecar_text = None
    if sidecar is not None:
        if not isinstance(sidecar, dict):
            raise TypeError(f"sidecar must be a dict, got {type(sidecar).__name__}")
        sidecar_text = _sidecar_json(sidecar, out, v, f, tex)  # fail before writing anything

    image = Image.fromarray(tex, mode="RGBA" if tex.shape[2] == 4 else "RGB")
    pbr = trimesh.visual.material.PBRMaterial(
        name=f"{name}_material",
        baseColorTexture=image,
        baseColorFactor=[float(c) for c in mat.base_color_factor],
        metallicFactor=float(mat.metallic),
        roughnessFactor=float(mat.roughness),
        doubleSided=mat.double_sided,
    )
    mesh = trimesh.Trimesh(
        vertices=engine_to_gltf(v).astype(np.float32),
        faces=f,
        process=False,
        validate=False,
    )
    # trimesh keeps UVs with a bottom-left origin and flips them on export.
    mesh.visual = trimesh.visual.TextureVisuals(uv=_to_trimesh_uv(uv), material=pbr)
    mesh.vertex_normals = engine_to_gltf(n)
    scene = trimesh.Scene()
    scene.add_geometry(mesh, node_name=name, geom_name=name)
    data = trimesh.exchange.gltf.export_glb(
        scene, include_normals=True, tree_postprocessor=lambda tree: _postprocess_tree(tree, name)
    )
    atomic_write(out, data)
    elapsed = time.perf_counter() - start
    if sidecar_text is not None:
        # the GLB's size is known only now; patch it in
        meta = json.loads(sidecar_text)
        meta["mesh"]["glb_bytes"] = len(data)
        meta["mesh"]["export_seconds"] = round(elapsed, 4)
        atomic_write(sidecar_path(out), (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    logger.info("export: %s (%d vertices, %d faces, %dx%d texture, %d bytes) in %.2f s",
                out, len(v), len(f), tex.shape[1], tex.shape[0], len(data), elapsed)
    return out


def _to_trimesh_uv(uv: np.ndarray) -> np.ndarray:
    """glTF UVs (top-left origin) -> trimesh's (bottom-left origin)."""
    out = uv.astype(np.float64, copy=True)
    out[:, 1] = 1.0 - out[:, 1]
    return out


def _sidecar_json(sidecar: dict, out: Path, v: np.ndarray, f: np.ndarray, tex: np.ndarray) -> str:
    meta = dict(sidecar)
    if "mesh" in meta:
        logger.warning("sidecar key 'mesh' is reserved for mesh statistics; the given value is replaced")
    meta["mesh"] = {
        "glb": out.name,
        "vertices": int(len(v)),
        "faces": int(len(f)),
        "texture_size": [int(tex.shape[1]), int(tex.shape[0])],
        "texture_channels": int(tex.shape[2]),
        "bounds_min": [float(x) for x in v.min(0)],
        "bounds_max": [float(x) for x in v.max(0)],
        "coordinates": "engine/Blender Z-up; the GLB is glTF Y-up: (x, y, z) -> (x, z, -y)",
        "uv_origin": "top-left (glTF)",
    }
    try:
        return json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"sidecar must be JSON-serializable: {err}") from err


def load_glb(path: str | os.PathLike[str]) -> LoadedGLB:
    """Read a GLB/glTF file as one mesh in engine coordinates (all nodes merged, transforms applied).

    Returns vertices (V, 3) float32, faces (F, 3) int64, uvs (V, 2) glTF convention or
    None, and the base-colour texture (H, W, C) uint8 or None. Meshes with several
    textured parts come back merged by trimesh (its texture packing), which may differ
    from the file's images.
    """
    import trimesh

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    mesh = trimesh.load(p, force="mesh", process=False)
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{p} holds no triangle mesh")
    vertices = gltf_to_engine(np.asarray(mesh.vertices, dtype=np.float64)).astype(np.float32)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    uvs = None
    texture = None
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        if visual.uv is not None and len(visual.uv) == len(vertices):
            uvs = _to_trimesh_uv(np.asarray(visual.uv, dtype=np.float64)[:, :2]).astype(np.float32)
        material = visual.material
        image = getattr(material, "baseColorTexture", None)
        if image is None:
            image = getattr(material, "image", None)
        if image is not None:
            if image.mode not in ("RGB", "RGBA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            texture = np.asarray(image, dtype=np.uint8).copy()
    return LoadedGLB(vertices=vertices, faces=faces, uvs=uvs, texture=texture)


class GLBFacts(NamedTuple):
    """What a client needs from an exported GLB besides the arrays it was made from."""

    name: str
    """The node's name (:func:`object_name`): the object name a client gives the result."""
    texture_png: bytes | None
    """The base-colour texture's PNG bytes as stored in the file (no decode, no re-encode)."""


def glb_facts(path: str | os.PathLike[str]) -> GLBFacts:
    """The node name and the texture PNG of a GLB this module wrote, read from its JSON and BIN chunks."""
    import struct

    data = Path(path).read_bytes()
    try:
        magic, version, length = struct.unpack_from("<4sII", data, 0)
        if magic != b"glTF" or version != 2 or length != len(data):
            raise ValueError("not a binary glTF 2.0 file")
        json_len, json_kind = struct.unpack_from("<I4s", data, 12)
        if json_kind != b"JSON":
            raise ValueError("the first chunk is not JSON")
        doc = json.loads(data[20:20 + json_len])
        binary = b""
        offset = 20 + json_len
        if offset + 8 <= len(data):
            bin_len, bin_kind = struct.unpack_from("<I4s", data, offset)
            if bin_kind == b"BIN\x00":
                binary = data[offset + 8:offset + 8 + bin_len]
        name = str(doc.get("nodes", [{}])[0].get("name", ""))
        texture = None
        for material in doc.get("materials", [])[:1]:
            ref = material.get("pbrMetallicRoughness", {}).get("baseColorTexture")
            if ref is not None:
                view = doc["bufferViews"][doc["images"][doc["textures"][ref["index"]]["source"]]["bufferView"]]
                start = view.get("byteOffset", 0)
                texture = bytes(binary[start:start + view["byteLength"]])
    except (struct.error, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"cannot read {path} as an exported GLB: {exc}") from None
    return GLBFacts(name, texture)


def read_mesh_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(vertices, faces, uvs or None) of a mesh file, engine coordinates; ValueError naming the file when unusable.

    GLB / glTF go through :func:`load_glb` (UVs kept); anything else trimesh reads (OBJ, PLY, STL) without UVs.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such mesh file: {path}")
    if path.suffix.lower() in (".glb", ".gltf"):
        try:
            loaded = load_glb(path)
        except (ValueError, OSError, KeyError, IndexError) as exc:
            raise ValueError(f"cannot read {path} as a glTF mesh: {exc}") from None
        return loaded.vertices, loaded.faces, loaded.uvs
    import trimesh

    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ValueError(f"cannot read {path} as a mesh: {exc}") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{path} holds no triangle mesh")
    return np.asarray(mesh.vertices), np.asarray(mesh.faces), None


def object_name(prompt: str, prefix: str = "") -> str:
    """A GLB node name from the prompt: its words without articles, joined by underscores."""
    words = [w for w in prompt.lower().replace(",", " ").split() if w not in {"a", "an", "the"}]
    return (prefix + "_".join(words))[:60] if words else (prefix.rstrip("_") or "generated")
