"""Binary glTF (GLB): write a checked mesh, read one back, and read what a client needs from one.

Coordinates: the engine works in Blender's world (right-handed, **Z up**); glTF is
right-handed **Y up**. An engine point ``(x, y, z)`` is written as the glTF point
``(x, z, -y)`` (a rotation of -90 degrees about X, so triangle winding is kept), exactly
the inverse of what Blender's glTF importer applies (glTF ``(X, Y, Z)`` -> Blender
``(X, -Z, Y)``): the object imports upright, each vertex at its engine coordinates.
:func:`load_glb` applies the inverse, so a round trip returns engine coordinates.

The GLB holds one node and one mesh named ``name``, with float32 positions, unit float32
normals, float32 ``TEXCOORD_0`` (glTF's top-left origin, our UVs unchanged), uint32
indices, and a metallic-roughness material: ``baseColorTexture`` (PNG, sRGB),
``normalTexture`` when the mesh has a normal map (PNG, linear), metallicFactor /
roughnessFactor; every texture sampled with mipmapped linear filtering and clamp-to-edge.

No TANGENT attribute: the glTF spec says a client computes MikkTSpace tangents from
positions, normals and ``TEXCOORD_0`` when they are absent, which is the convention the
normal map is baked in (Blender always computes MikkTSpace itself and ignores stored
tangents); writing tangents from any other algorithm would disagree with the bake.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from engine_server.export.mesh import CheckedMesh, flip_v
from engine_server.wire.files import atomic_write

logger = logging.getLogger(__name__)

# glTF enums
_ARRAY_BUFFER = 34962
_ELEMENT_ARRAY_BUFFER = 34963
_LINEAR = 9729
_LINEAR_MIPMAP_LINEAR = 9987
_CLAMP_TO_EDGE = 33071

ENGINE_TO_GLTF = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
"""(3, 3) rotation taking engine (Blender, Z-up) coordinates to glTF (Y-up): (x, y, z) -> (x, z, -y)."""


def engine_to_gltf(points: np.ndarray) -> np.ndarray:
    """Engine (Blender, Z-up) points or directions (..., 3) -> glTF (Y-up): (x, y, z) -> (x, z, -y)."""
    p = np.asarray(points)
    return np.stack([p[..., 0], p[..., 2], -p[..., 1]], axis=-1)


def gltf_to_engine(points: np.ndarray) -> np.ndarray:
    """glTF (Y-up) points or directions (..., 3) -> engine (Z-up): (x, y, z) -> (x, -z, y)."""
    p = np.asarray(points)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], axis=-1)


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


def write_glb(out: Path, m: CheckedMesh, name: str) -> list[Path]:
    """Write ``m`` as one GLB at ``out`` (atomically); returns ``[out]``."""
    import trimesh
    from PIL import Image

    mat = m.material
    pbr = trimesh.visual.material.PBRMaterial(
        name=f"{name}_material",
        baseColorTexture=Image.fromarray(m.base_color, mode="RGBA" if m.base_color.shape[2] == 4 else "RGB"),
        normalTexture=None if m.normal_map is None else Image.fromarray(m.normal_map, mode="RGB"),
        baseColorFactor=[float(c) for c in mat.base_color_factor],
        metallicFactor=float(mat.metallic),
        roughnessFactor=float(mat.roughness),
        doubleSided=mat.double_sided,
    )
    mesh = trimesh.Trimesh(vertices=engine_to_gltf(m.vertices).astype(np.float32), faces=m.faces,
                           process=False, validate=False)
    # trimesh keeps UVs with a bottom-left origin and flips them on export.
    mesh.visual = trimesh.visual.TextureVisuals(uv=flip_v(m.uvs), material=pbr)
    mesh.vertex_normals = engine_to_gltf(m.normals)
    scene = trimesh.Scene()
    scene.add_geometry(mesh, node_name=name, geom_name=name)
    data = trimesh.exchange.gltf.export_glb(
        scene, include_normals=True, tree_postprocessor=lambda tree: _postprocess_tree(tree, name)
    )
    atomic_write(out, data)
    return [out]


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
            uvs = flip_v(np.asarray(visual.uv, dtype=np.float64)[:, :2]).astype(np.float32)
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
    """The node's name (:func:`engine_server.export.object_name`): the object name a client gives the result."""
    texture_png: bytes | None
    """The base-colour texture's PNG bytes as stored in the file (no decode, no re-encode)."""
    normal_png: bytes | None = None
    """The normal map's PNG bytes as stored in the file, or None without one."""
    metallic: float = 1.0
    """metallicFactor (glTF's default 1 when the file leaves it out)."""
    roughness: float = 1.0
    """roughnessFactor (glTF's default 1 when the file leaves it out)."""


def glb_facts(path: str | os.PathLike[str]) -> GLBFacts:
    """The node name, texture PNGs and material factors of a GLB this module wrote, read from its JSON and BIN chunks."""
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

        def image_bytes(ref: dict | None) -> bytes | None:
            if ref is None:
                return None
            view = doc["bufferViews"][doc["images"][doc["textures"][ref["index"]]["source"]]["bufferView"]]
            start = view.get("byteOffset", 0)
            return bytes(binary[start:start + view["byteLength"]])

        name = str(doc.get("nodes", [{}])[0].get("name", ""))
        material = (doc.get("materials") or [{}])[0]
        pbr = material.get("pbrMetallicRoughness", {})
        return GLBFacts(name, image_bytes(pbr.get("baseColorTexture")), image_bytes(material.get("normalTexture")),
                        float(pbr.get("metallicFactor", 1.0)), float(pbr.get("roughnessFactor", 1.0)))
    except (struct.error, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"cannot read {path} as an exported GLB: {exc}") from None
