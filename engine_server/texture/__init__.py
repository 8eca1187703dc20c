"""Texture stage: UV unwrap (xatlas), rasterize the atlas, bake colours from a field into an image.

UVs everywhere in this package follow glTF: (0, 0) is the image's top-left corner
(see :mod:`engine_server.texture.unwrap`); positions are engine (Blender, Z-up)
coordinates. Typical use::

    uv_mesh = unwrap(vertices, faces, UnwrapConfig(texture_size=1024))
    texture = bake_texture(uv_mesh, color_fn, BakeConfig(size=1024))   # (1024, 1024, 3) uint8

and, for a texture-only refine of an existing mesh, ``bake_onto_uvs(vertices, faces,
uvs_or_None, color_fn)``.
"""
from __future__ import annotations

from engine_server.texture.bake import (
    BakeConfig,
    ColorFn,
    UVRaster,
    bake_onto_uvs,
    bake_texture,
    dilate,
    push_pull_fill,
    rasterize_uv,
    reuse_or_unwrap,
)
from engine_server.texture.unwrap import UnwrapConfig, UVMesh, flip_v, unwrap, usable_uvs, uv_mesh_from_corner_uvs

__all__ = [
    "BakeConfig",
    "ColorFn",
    "UVMesh",
    "UVRaster",
    "UnwrapConfig",
    "bake_onto_uvs",
    "bake_texture",
    "dilate",
    "flip_v",
    "push_pull_fill",
    "rasterize_uv",
    "reuse_or_unwrap",
    "unwrap",
    "usable_uvs",
    "uv_mesh_from_corner_uvs",
]
