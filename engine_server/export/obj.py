"""Wavefront OBJ + MTL + PNG: ``<stem>.obj``, ``<stem>.mtl``, ``<stem>_basecolor.png`` (+ ``<stem>_normal.png``).

Coordinates: OBJ has no up axis of its own; readers (Blender's importer by default, Maya,
three.js) take +Y as up, so the file holds the glTF-style point ``(x, z, -y)`` of each
engine point and Blender's default import (forward -Z, up Y) puts it back at ``(x, y, z)``.
``vt`` has a bottom-left origin (our UVs' v is flipped); ``vn`` holds the vertex normals.

The MTL states the material the way Blender's OBJ importer reads it (checked with Blender
3.4 and 5.0): ``map_Kd`` the base colour, ``map_Bump -bm 1`` the tangent-space normal map
(Blender connects it through a Normal Map node, non-colour), ``Pr`` / ``Pm`` the PBR
roughness / metallic (the OBJ PBR extension, read since Blender 3.5) and, for readers
without it, ``Ns`` = 1000 (1 - roughness)^2 (Blender: roughness = 1 - sqrt(Ns / 1000)).

Each file is written atomically, the images first and the OBJ last, so a reader that sees
the OBJ sees everything it names.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from engine_server.export.gltf import engine_to_gltf
from engine_server.export.mesh import CheckedMesh, flip_v, png_bytes, texture_names
from engine_server.wire.files import atomic_write

logger = logging.getLogger(__name__)


def _rows(fmt: str, values: np.ndarray) -> str:
    buf = io.StringIO()
    np.savetxt(buf, values, fmt=fmt)
    return buf.getvalue()


def mtl_text(m: CheckedMesh, material_name: str, images: dict[str, str]) -> str:
    """The MTL file's text for ``m``'s material, naming the image files ``images`` (see module docstring)."""
    mat = m.material
    r, g, b, alpha = mat.base_color_factor
    lines = [
        "# engine-server: metallic-roughness material (Pr / Pm) with a tangent-space normal map",
        f"newmtl {material_name}",
        f"Kd {r:.6f} {g:.6f} {b:.6f}",
        "Ka 0.000000 0.000000 0.000000",
        "Ks 0.500000 0.500000 0.500000",
        f"Ns {1000.0 * (1.0 - mat.roughness) ** 2:.6f}",
        f"Pr {mat.roughness:.6f}",
        f"Pm {mat.metallic:.6f}",
        f"d {alpha:.6f}",
        "illum 2",
        f"map_Kd {images['base_color']}",
    ]
    if "normal_map" in images:
        lines.append(f"map_Bump -bm 1.000000 {images['normal_map']}")
    return "\n".join(lines) + "\n"


def write_obj(out: Path, m: CheckedMesh, name: str) -> list[Path]:
    """Write ``m`` as ``out`` (.obj) with its MTL and PNGs beside it; returns the files, the OBJ first."""
    from engine_server import __version__

    images = texture_names(out.stem, m.normal_map is not None)
    written = [atomic_write(out.with_name(images["base_color"]), png_bytes(m.base_color))]
    if m.normal_map is not None:
        written.append(atomic_write(out.with_name(images["normal_map"]), png_bytes(m.normal_map)))
    mtl = out.with_suffix(".mtl")
    material_name = f"{name}_material"
    atomic_write(mtl, mtl_text(m, material_name, images).encode("utf-8"))
    corner = np.repeat(m.faces + 1, 3, axis=1)  # v/vt/vn share one index per corner (OBJ counts from 1)
    text = "".join([
        f"# engine-server {__version__}: {len(m.vertices)} vertices, {len(m.faces)} triangles, Y up\n",
        f"mtllib {mtl.name}\n",
        f"o {name}\n",
        _rows("v %.7g %.7g %.7g", engine_to_gltf(m.vertices)),
        _rows("vt %.7g %.7g", flip_v(m.uvs)),
        _rows("vn %.6f %.6f %.6f", engine_to_gltf(m.normals)),
        f"usemtl {material_name}\n",
        "s 1\n",
        _rows("f %d/%d/%d %d/%d/%d %d/%d/%d", corner),
    ])
    atomic_write(out, text.encode("utf-8"))
    return [out, mtl, *written]
