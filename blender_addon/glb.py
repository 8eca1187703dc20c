"""Read the engine's binary glTF result without Blender: geometry in engine coordinates and the texture PNG.

No bpy import (testable with plain Python). numpy is used (Blender ships it).

The engine writes an engine point ``(x, y, z)`` (Z up, Blender's world) as the glTF point
``(x, z, -y)`` (see ``engine_server/export.py``); :func:`read_glb` maps it back, so the
vertices returned are the engine's. UVs stay in glTF's convention ((0, 0) = the image's
top-left), as the engine's ``uvs`` arrays are; :func:`blender_uvs` flips them for Blender.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

_COMPONENTS = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


class GLBError(ValueError):
    """The bytes are not a GLB this reader understands; the message names the problem."""


@dataclass
class GLBMesh:
    """The first mesh primitive of a GLB, in engine (Z-up) coordinates."""

    vertices: np.ndarray
    """(V, 3) float32, engine coordinates."""
    faces: np.ndarray
    """(F, 3) int32 triangle indices."""
    uvs: np.ndarray | None
    """(V, 2) float32 in glTF convention (top-left origin), or None."""
    texture_png: bytes | None
    """The base-colour texture's image bytes (PNG), or None."""
    name: str = ""
    """The mesh's name in the file."""


def _chunks(data: bytes) -> tuple[dict, bytes]:
    if len(data) < 20:
        raise GLBError("GLB shorter than its header")
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF" or version != 2:
        raise GLBError("not a binary glTF 2.0 file")
    if length > len(data):
        raise GLBError(f"GLB header says {length} bytes, got {len(data)}")
    doc, binary, offset = None, b"", 12
    while offset + 8 <= length:
        size, kind = struct.unpack_from("<I4s", data, offset)
        body = data[offset + 8: offset + 8 + size]
        if kind == b"JSON":
            doc = json.loads(bytes(body).decode("utf-8"))
        elif kind == b"BIN\x00":
            binary = bytes(body)
        offset += 8 + size + (-size % 4)
    if doc is None:
        raise GLBError("GLB has no JSON chunk")
    return doc, binary


def _view(doc: dict, binary: bytes, index: int) -> bytes:
    view = doc["bufferViews"][index]
    start = view.get("byteOffset", 0)
    return binary[start: start + view["byteLength"]]


def _accessor(doc: dict, binary: bytes, index: int) -> np.ndarray:
    acc = doc["accessors"][index]
    dtype = np.dtype(_COMPONENTS[acc["componentType"]]).newbyteorder("<")
    width = _WIDTH[acc["type"]]
    view = doc["bufferViews"][acc["bufferView"]]
    stride = view.get("byteStride") or dtype.itemsize * width
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    count = acc["count"]
    if stride == dtype.itemsize * width:
        out = np.frombuffer(binary, dtype, count * width, start).reshape(count, width)
    else:
        rows = np.frombuffer(binary, np.uint8, (count - 1) * stride + dtype.itemsize * width, start)
        out = np.lib.stride_tricks.as_strided(rows, (count, dtype.itemsize * width), (stride, 1)).copy()
        out = out.view(dtype).reshape(count, width)
    return out


def read_glb(data: bytes) -> GLBMesh:
    """The first triangle primitive of ``data`` (a GLB) with its base-colour texture; raises GLBError."""
    try:
        doc, binary = _chunks(data)
        mesh = doc["meshes"][0]
        prim = mesh["primitives"][0]
        if prim.get("mode", 4) != 4:
            raise GLBError(f"primitive mode {prim.get('mode')} is not triangles")
        pos = _accessor(doc, binary, prim["attributes"]["POSITION"]).astype(np.float32)
        vertices = np.ascontiguousarray(np.stack([pos[:, 0], -pos[:, 2], pos[:, 1]], 1))
        if "indices" in prim:
            faces = _accessor(doc, binary, prim["indices"]).reshape(-1, 3).astype(np.int32)
        else:
            faces = np.arange(len(vertices), dtype=np.int32).reshape(-1, 3)
        uvs = None
        if "TEXCOORD_0" in prim["attributes"]:
            uvs = np.ascontiguousarray(_accessor(doc, binary, prim["attributes"]["TEXCOORD_0"]), dtype=np.float32)
        texture = None
        if "material" in prim:
            material = doc["materials"][prim["material"]]
            tex_ref = material.get("pbrMetallicRoughness", {}).get("baseColorTexture")
            if tex_ref is not None:
                image = doc["images"][doc["textures"][tex_ref["index"]]["source"]]
                if "bufferView" in image:
                    texture = _view(doc, binary, image["bufferView"])
        return GLBMesh(vertices, np.ascontiguousarray(faces), uvs, texture, mesh.get("name", ""))
    except (KeyError, IndexError, TypeError, ValueError, struct.error) as exc:
        if isinstance(exc, GLBError):
            raise
        raise GLBError(f"cannot read the GLB: {type(exc).__name__}: {exc}") from exc


def blender_uvs(uvs: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Per-loop UVs for Blender ((F*3, 2) float32, bottom-left origin) from per-vertex glTF UVs (V, 2)."""
    loop_uv = np.asarray(uvs, dtype=np.float32)[np.asarray(faces).reshape(-1)]
    loop_uv[:, 1] = 1.0 - loop_uv[:, 1]
    return loop_uv
