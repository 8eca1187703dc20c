"""USD (``.usda`` text, ``.usdc`` / ``.usd`` binary crate) and USDZ through usd-core (``pip install engine-server[usd]``).

The stage is Z-up with ``metersPerUnit`` 1, like the engine and Blender, so points are
written as they are (no axis swap). Layout::

    /<name>            Xform, the default prim (kind component)
    /<name>/<name>     Mesh: points, triangle faces, vertex normals, primvars:st, no subdivision
    /<name>/material   UsdPreviewSurface: diffuseColor <- base colour (sRGB), normal <- normal map
                       (raw, scale (2, 2, 2, 1), bias (-1, -1, -1, 0): 8-bit [0, 1] -> [-1, 1]),
                       roughness, metallic

The Xform's only children are the mesh and its material, so Blender's USD importer merges
the Xform into one mesh object named ``<name>`` (as the GLB and OBJ import).

``st`` has a bottom-left origin (our UVs' v is flipped). A ``.usd*`` file refers to its
PNGs beside it (``<stem>_basecolor.png``, ``<stem>_normal.png``, by relative path); a
``.usdz`` package holds the stage and its PNGs in one file (UsdUtils packaging).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from engine_server.export.mesh import CheckedMesh, flip_v, png_bytes, texture_names
from engine_server.wire.files import fsync_dir

logger = logging.getLogger(__name__)

USD_EXTRA = "pip install 'engine-server[usd]' (usd-core)"
"""How to get the USD writer, named in the error when usd-core is missing."""


def usd_available() -> bool:
    """Whether usd-core is importable (USD / USDZ export works)."""
    try:
        import pxr  # noqa: F401
    except ImportError:
        return False
    return True


def _build_stage(path: Path, m: CheckedMesh, name: str, images: dict[str, str]) -> None:
    """Create the stage at ``path`` (format from its extension) referring to ``images`` by relative path, and save."""
    from pxr import Gf, Sdf, Tf, Usd, UsdGeom, UsdShade, Vt

    stage = Usd.Stage.CreateNew(str(path))
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.z)
    UsdGeom.SetStageMetersPerUnit(stage, 1.0)
    root_path = Sdf.Path("/" + Tf.MakeValidIdentifier(name))
    root = UsdGeom.Xform.Define(stage, root_path)
    stage.SetDefaultPrim(root.GetPrim())
    Usd.ModelAPI(root.GetPrim()).SetKind("component")

    mesh = UsdGeom.Mesh.Define(stage, root_path.AppendChild(root_path.name))
    points = Vt.Vec3fArray.FromNumpy(m.vertices.astype("float32"))
    mesh.CreatePointsAttr(points)
    mesh.CreateExtentAttr(UsdGeom.PointBased.ComputeExtent(points))
    mesh.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(len(m.faces), 3, dtype=np.int32)))
    mesh.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(m.faces.reshape(-1).astype("int32")))
    mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
    mesh.CreateOrientationAttr(UsdGeom.Tokens.rightHanded)
    mesh.CreateNormalsAttr(Vt.Vec3fArray.FromNumpy(m.normals.astype("float32")))
    mesh.SetNormalsInterpolation(UsdGeom.Tokens.vertex)
    st = UsdGeom.PrimvarsAPI(mesh).CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray, UsdGeom.Tokens.vertex)
    st.Set(Vt.Vec2fArray.FromNumpy(flip_v(m.uvs).astype("float32")))

    material = UsdShade.Material.Define(stage, root_path.AppendChild("material"))
    surface = UsdShade.Shader.Define(stage, material.GetPath().AppendChild("surface"))
    surface.CreateIdAttr("UsdPreviewSurface")
    mat = m.material
    surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(float(mat.roughness))
    surface.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(float(mat.metallic))
    surface.CreateInput("opacity", Sdf.ValueTypeNames.Float).Set(float(mat.base_color_factor[3]))
    material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")

    reader = UsdShade.Shader.Define(stage, material.GetPath().AppendChild("st_reader"))
    reader.CreateIdAttr("UsdPrimvarReader_float2")
    reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("st")
    reader.CreateOutput("result", Sdf.ValueTypeNames.Float2)

    def texture(prim_name: str, file: str, colour_space: str, scale=None, bias=None):
        tex = UsdShade.Shader.Define(stage, material.GetPath().AppendChild(prim_name))
        tex.CreateIdAttr("UsdUVTexture")
        tex.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(Sdf.AssetPath(f"./{file}"))
        tex.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(reader.ConnectableAPI(), "result")
        tex.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set(colour_space)
        for wrap in ("wrapS", "wrapT"):
            tex.CreateInput(wrap, Sdf.ValueTypeNames.Token).Set("clamp")
        if scale is not None:
            tex.CreateInput("scale", Sdf.ValueTypeNames.Float4).Set(Gf.Vec4f(*scale))
            tex.CreateInput("bias", Sdf.ValueTypeNames.Float4).Set(Gf.Vec4f(*bias))
        tex.CreateOutput("rgb", Sdf.ValueTypeNames.Float3)
        return tex

    base = texture("base_color", images["base_color"], "sRGB",
                   scale=(*mat.base_color_factor[:3], 1.0), bias=(0.0, 0.0, 0.0, 0.0))
    surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).ConnectToSource(base.ConnectableAPI(), "rgb")
    if "normal_map" in images:
        normal = texture("normal_map", images["normal_map"], "raw", scale=(2.0, 2.0, 2.0, 1.0), bias=(-1.0, -1.0, -1.0, 0.0))
        surface.CreateInput("normal", Sdf.ValueTypeNames.Normal3f).ConnectToSource(normal.ConnectableAPI(), "rgb")
    UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(material)
    stage.GetRootLayer().Save()


def write_usd(out: Path, m: CheckedMesh, name: str) -> list[Path]:
    """Write ``m`` as ``out``: a .usda/.usdc/.usd stage with its PNGs beside it, or one .usdz package.

    The stage is built in a private temporary folder, then moved (or packaged) into place,
    so no half-written file ever has the output's name.
    """
    if not usd_available():
        raise ValueError(f"USD export needs usd-core, which is not installed: {USD_EXTRA}")
    from pxr import UsdUtils

    usdz = out.suffix.lower() == ".usdz"
    images = texture_names(out.stem, m.normal_map is not None)
    with tempfile.TemporaryDirectory(prefix=".usd-", dir=out.parent) as tmp:
        work = Path(tmp)
        (work / images["base_color"]).write_bytes(png_bytes(m.base_color))
        if m.normal_map is not None:
            (work / images["normal_map"]).write_bytes(png_bytes(m.normal_map))
        # usdz: the crate format, as Apple's tools write it; otherwise the format the extension names
        stage_path = work / (f"{out.stem}.usdc" if usdz else out.name)
        _build_stage(stage_path, m, name, images)
        if usdz:
            packaged = work / out.name
            if not UsdUtils.CreateNewUsdzPackage(str(stage_path), str(packaged)):
                raise RuntimeError(f"usd-core could not package {out.name}")
            return [_move(packaged, out)]
        written = [_move(work / file, out.with_name(file)) for file in images.values()]
        return [_move(stage_path, out), *written]


def _move(src: Path, dst: Path) -> Path:
    """Move a finished file from the temporary folder (inside ``dst``'s folder) into place: fsync, rename."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    fsync_dir(dst.parent)
    return dst
