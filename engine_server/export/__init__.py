"""Export the engine's textured mesh as GLB, OBJ + MTL + PNG, or USD / USDZ, and read meshes back.

One in-memory description (:class:`TexturedMesh`: vertices, faces, UVs, base colour, normal
map, roughness / metallic) is written by :func:`export_mesh` in the format its path's
extension names (:data:`FORMATS`); each writer is one module: :mod:`.gltf`, :mod:`.obj`,
:mod:`.usd` (usd-core, the optional ``usd`` extra).

Coordinates: the engine works in Blender's world (right-handed, **Z up**). glTF and OBJ are
**Y up** and are written as ``(x, z, -y)``, the inverse of what Blender's importers apply, so
the object imports upright at its engine coordinates; USD stages are written Z-up as they
are. UVs are given in glTF's convention ((0, 0) is the image's top-left, see
:mod:`engine_server.texture.unwrap`); OBJ and USD store them with a bottom-left origin.

Sidecar: ``<stem>.json`` beside the file (``model.glb`` -> ``model.json``): the caller's dict
(prompt, seed, preset, model, guidance, timings ...) plus a ``"mesh"`` entry written here
(file, format, counts, bounds in engine coordinates, texture size, material factors, each
written file's size, the coordinate convention). Every file is written atomically.

This package does not import torch (it accepts tensors all the same).
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from engine_server.export.gltf import (
    ENGINE_TO_GLTF,
    GLBFacts,
    LoadedGLB,
    engine_to_gltf,
    glb_facts,
    gltf_to_engine,
    load_glb,
    write_glb,
)
from engine_server.export.mesh import (
    MaterialParams,
    TexturedMesh,
    check_mesh,
    sidecar_path,
    sidecar_text,
    smooth_normals,
    write_sidecar,
)
from engine_server.export.obj import write_obj
from engine_server.export.usd import USD_EXTRA, usd_available, write_usd
from engine_server.wire.protocol import EXPORT_FORMATS

__all__ = [
    "ENGINE_TO_GLTF", "EXTENSIONS", "FORMATS", "SUFFIXES", "GLBFacts", "LoadedGLB", "MaterialParams", "TexturedMesh",
    "USD_EXTRA", "engine_to_gltf", "export_glb", "export_mesh", "format_of", "glb_facts", "gltf_to_engine",
    "load_glb", "object_name", "read_mesh_file", "sidecar_path", "smooth_normals", "usd_available",
]

logger = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
"""Export formats (the wire's ``options.format``); GLB is the default."""
EXTENSIONS = {".glb": "glb", ".obj": "obj", ".usd": "usd", ".usda": "usd", ".usdc": "usd", ".usdz": "usdz"}
"""Output file extension -> format."""
SUFFIXES = {"glb": ".glb", "obj": ".obj", "usd": ".usd", "usdz": ".usdz"}
"""Format -> the extension a file of that format gets when only the format is given (``.usd``: binary crate)."""
_WRITERS = {"glb": write_glb, "obj": write_obj, "usd": write_usd, "usdz": write_usd}


def format_of(path: str | os.PathLike[str]) -> str:
    """The export format a path's extension names; ValueError naming the extension and the ones that work."""
    suffix = Path(path).suffix.lower()
    fmt = EXTENSIONS.get(suffix)
    if fmt is None:
        raise ValueError(f"cannot export to {suffix or 'a file without an extension'!r} ({Path(path).name}): "
                         f"the extension must be one of {', '.join(EXTENSIONS)}")
    if fmt in ("usd", "usdz") and not usd_available():
        raise ValueError(f"{suffix} export needs usd-core, which is not installed: {USD_EXTRA}")
    return fmt


def export_mesh(path: str | os.PathLike[str], mesh: TexturedMesh, name: str = "generated",
                sidecar: dict | None = None) -> Path:
    """Write ``mesh`` in the format its path's extension names (:data:`EXTENSIONS`); returns the path.

    Checks the extension, the folder and the mesh before anything is written. With ``sidecar``
    (a JSON-serializable dict) also writes :func:`sidecar_path` (``<stem>.json``), after the files.
    """
    start = time.perf_counter()
    out = Path(path)
    fmt = format_of(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the directory for {out} does not exist")
    checked = check_mesh(mesh)
    text = None if sidecar is None else sidecar_text(sidecar, out, fmt, checked)  # fails before writing anything
    files = _WRITERS[fmt](out, checked, name)
    elapsed = time.perf_counter() - start
    if text is not None:
        write_sidecar(out, text, files, elapsed)
    logger.info("export: %s (%d vertices, %d faces, %dx%d texture%s, %d bytes in %d files) in %.2f s",
                out, len(checked.vertices), len(checked.faces), checked.base_color.shape[1],
                checked.base_color.shape[0], " + normal map" if checked.normal_map is not None else "",
                sum(p.stat().st_size for p in files), len(files), elapsed)
    return out


def export_glb(
    path: str | os.PathLike[str],
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    texture: np.ndarray,
    material: MaterialParams | None = None,
    name: str = "generated",
    sidecar: dict | None = None,
    normals: np.ndarray | None = None,
    normal_map: np.ndarray | None = None,
) -> Path:
    """:func:`export_mesh` of the arrays as a :class:`TexturedMesh` into ``path``, which must end in ``.glb``.

    vertices: (V, 3) engine (Z-up) coordinates; faces: (F, 3) int; uvs: (V, 2) glTF
    convention; texture: (H, W, 3|4) uint8, row 0 = top; normals: optional (V, 3)
    engine-space vertex normals (default :func:`smooth_normals`); normal_map: optional
    (H, W, 3) uint8 tangent-space normal map. Numpy arrays or torch tensors.
    """
    if Path(path).suffix.lower() != ".glb":
        raise ValueError(f"export path must end in .glb, got {path}")
    mesh = TexturedMesh(vertices, faces, uvs, texture, normal_map=normal_map, material=material or MaterialParams(),
                        normals=normals)
    return export_mesh(path, mesh, name=name, sidecar=sidecar)


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
    """A GLB node name from the prompt: its words without articles or punctuation, joined by underscores."""
    words = [w for w in re.findall(r"\w+", prompt.lower()) if w not in {"a", "an", "the"}]
    return (prefix + "_".join(words))[:60] if words else (prefix.rstrip("_") or "generated")
