"""One TexturedMesh -> GLB, OBJ + MTL + PNG, USD / USDZ: each file read back and checked against the mesh.

USD files are read with usd-core and checked by its validators (``UsdValidation``, what
``usdchecker`` runs; ``UsdUtils.ComplianceChecker`` on older usd-core). Skipped with the
reason when usd-core is missing (``pip install 'engine-server[usd]'``).
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import trimesh
from PIL import Image

from engine_server.export import (
    EXTENSIONS,
    FORMATS,
    TexturedMesh,
    engine_to_gltf,
    export_mesh,
    format_of,
    glb_facts,
    smooth_normals,
    usd_available,
)

from .conftest import MATERIAL
from .test_export import read_glb

needs_usd = pytest.mark.skipif(not usd_available(), reason="usd-core is not installed: pip install 'engine-server[usd]'")


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_extensions_name_the_formats():
    assert set(EXTENSIONS.values()) == set(FORMATS) and FORMATS[0] == "glb"
    assert [format_of(f"a/chair{ext}") for ext in (".glb", ".OBJ", ".usda", ".usdc", ".usd", ".usdz")] == [
        "glb", "obj", "usd", "usd", "usd", "usdz"]
    for bad in ("chair.fbx", "chair.gltf", "chair"):
        with pytest.raises(ValueError, match=r"extension must be one of \.glb, \.obj, \.usd, \.usda, \.usdc, \.usdz"):
            format_of(bad)


def test_an_unknown_extension_writes_nothing(asset, tmp_path):
    with pytest.raises(ValueError, match=r"'\.fbx'"):
        export_mesh(tmp_path / "chair.fbx", asset, sidecar={})
    assert list(tmp_path.iterdir()) == []


def test_usd_without_usd_core_names_the_extra():
    # a fresh interpreter in which pxr cannot be imported, as on an install without the extra
    code = ("import sys; sys.modules['pxr'] = None\n"
            "from engine_server.export import format_of\n"
            "try:\n    format_of('chair.usdz')\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert ".usdz export needs usd-core" in out and "engine-server[usd]" in out


def test_bad_normal_map_is_refused(asset, tmp_path):
    bad = TexturedMesh(asset.vertices, asset.faces, asset.uvs, asset.base_color,
                       normal_map=np.zeros((8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"normal_map must be \(H, W, 3\)"):
        export_mesh(tmp_path / "x.obj", bad)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- GLB


def test_glb_has_the_normal_texture_and_factors(asset, tmp_path):
    path = export_mesh(tmp_path / "model.glb", asset, name="thing")
    tree, blob = read_glb(path)
    material = tree["materials"][0]
    assert material["pbrMetallicRoughness"]["metallicFactor"] == pytest.approx(MATERIAL.metallic)
    assert material["pbrMetallicRoughness"]["roughnessFactor"] == pytest.approx(MATERIAL.roughness)
    normal = tree["textures"][material["normalTexture"]["index"]]
    assert tree["samplers"][normal["sampler"]]["wrapS"] == 33071
    # no TANGENT: viewers generate MikkTSpace tangents, the bake's convention
    assert "TANGENT" not in tree["meshes"][0]["primitives"][0]["attributes"]
    facts = glb_facts(path)
    np.testing.assert_array_equal(png_array(facts.normal_png), asset.normal_map)
    np.testing.assert_array_equal(png_array(facts.texture_png), asset.base_color)
    assert (facts.metallic, facts.roughness) == pytest.approx((MATERIAL.metallic, MATERIAL.roughness))
    assert facts.name == "thing"


def test_glb_without_a_normal_map_has_none(textured, tmp_path):
    m = textured.mesh
    path = export_mesh(tmp_path / "plain.glb", TexturedMesh(m.vertices, m.faces, m.uvs, textured.texture))
    assert "normalTexture" not in read_glb(path)[0]["materials"][0]
    assert glb_facts(path).normal_png is None


# ----------------------------------------------------------------------------- OBJ


def test_obj_reads_back_with_trimesh(asset, tmp_path):
    path = export_mesh(tmp_path / "chair.obj", asset, name="chair", sidecar={"prompt": "a chair"})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["chair.json", "chair.mtl", "chair.obj", "chair_basecolor.png", "chair_normal.png"]
    back = trimesh.load(path, force="mesh", process=False, maintain_order=True)
    assert len(back.faces) == len(asset.faces)
    np.testing.assert_allclose(back.vertices, engine_to_gltf(asset.vertices), atol=1e-6)  # Y-up in the file
    np.testing.assert_array_equal(back.faces, asset.faces)
    np.testing.assert_allclose(back.visual.uv[:, 1], 1.0 - asset.uvs[:, 1], atol=1e-6)  # bottom-left origin
    np.testing.assert_allclose(back.visual.uv[:, 0], asset.uvs[:, 0], atol=1e-6)
    vn = np.array([line.split()[1:] for line in path.read_text().splitlines() if line.startswith("vn ")], dtype=float)
    np.testing.assert_allclose(vn, engine_to_gltf(smooth_normals(asset.vertices, asset.faces)), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.visual.material.image), asset.base_color)
    mtl = (tmp_path / "chair.mtl").read_text()
    assert "map_Kd chair_basecolor.png" in mtl and "map_Bump -bm 1.000000 chair_normal.png" in mtl
    assert "Pr 0.600000" in mtl and "Pm 0.250000" in mtl and "Ns 160.000000" in mtl
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "chair_normal.png")), asset.normal_map)
    side = json.loads((tmp_path / "chair.json").read_text())
    assert side["prompt"] == "a chair" and side["mesh"]["format"] == "obj" and side["mesh"]["normal_map"]
    assert set(side["mesh"]["files"]) == {"chair.obj", "chair.mtl", "chair_basecolor.png", "chair_normal.png"}


# ----------------------------------------------------------------------------- USD


def usd_errors(path) -> list[str]:
    """Every problem usd-core's validators find in the file (all registered validators, usdz package rules too)."""
    from pxr import Usd

    try:
        from pxr import UsdValidation
    except ImportError:  # usd-core before UsdValidation: the compliance checker usdchecker ran then
        from pxr import UsdUtils

        checker = UsdUtils.ComplianceChecker(rootPackageOnly=False, skipVariants=False, verbose=False)
        checker.CheckCompliance(str(path))
        return list(checker.GetErrors()) + list(checker.GetFailedChecks())
    validators = UsdValidation.ValidationRegistry().GetOrLoadAllValidators()
    errors = UsdValidation.ValidationContext(validators).Validate(Usd.Stage.Open(str(path)))
    return [f"{e.GetName()}: {e.GetMessage()}" for e in errors]


@needs_usd
def test_usd_checker_finds_a_broken_normal_map(asset, tmp_path):
    # guard against a checker that always passes: 8-bit normals without scale / bias are an error
    from pxr import Usd, UsdShade

    path = export_mesh(tmp_path / "broken.usda", asset, name="thing")
    stage = Usd.Stage.Open(str(path))
    normal = UsdShade.Shader(stage.GetPrimAtPath("/thing/material/normal_map"))
    normal.GetPrim().RemoveProperty("inputs:bias")
    normal.GetPrim().RemoveProperty("inputs:scale")
    stage.GetRootLayer().Save()
    assert usd_errors(path)


@needs_usd
@pytest.mark.parametrize("ext", [".usda", ".usdc", ".usd"])
def test_usd_stage_reads_back_and_validates(asset, tmp_path, ext):
    from pxr import Usd, UsdGeom, UsdShade

    path = export_mesh(tmp_path / f"chair{ext}", asset, name="chair")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"chair{ext}", "chair_basecolor.png",
                                                                 "chair_normal.png"])
    assert usd_errors(path) == []
    stage = Usd.Stage.Open(str(path))
    assert UsdGeom.GetStageUpAxis(stage) == UsdGeom.Tokens.z and UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    assert stage.GetDefaultPrim().GetPath() == "/chair"
    mesh = UsdGeom.Mesh(stage.GetPrimAtPath("/chair/chair"))
    np.testing.assert_allclose(np.array(mesh.GetPointsAttr().Get()), asset.vertices, atol=1e-7)  # Z-up, no swap
    np.testing.assert_array_equal(np.array(mesh.GetFaceVertexIndicesAttr().Get()).reshape(-1, 3), asset.faces)
    st = UsdGeom.PrimvarsAPI(mesh).GetPrimvar("st")
    assert st.GetInterpolation() == "vertex"
    np.testing.assert_allclose(np.array(st.Get())[:, 1], 1.0 - asset.uvs[:, 1], atol=1e-6)
    material = UsdShade.MaterialBindingAPI(mesh.GetPrim()).ComputeBoundMaterial()[0]
    surface = material.ComputeSurfaceSource()[0]
    assert surface.GetIdAttr().Get() == "UsdPreviewSurface"
    assert surface.GetInput("roughness").Get() == pytest.approx(MATERIAL.roughness)
    assert surface.GetInput("metallic").Get() == pytest.approx(MATERIAL.metallic)
    normal = UsdShade.Shader(surface.GetInput("normal").GetConnectedSources()[0][0].source.GetPrim())
    assert normal.GetInput("sourceColorSpace").Get() == "raw"
    assert tuple(normal.GetInput("scale").Get()) == (2, 2, 2, 1) and tuple(normal.GetInput("bias").Get()) == (-1, -1, -1, 0)
    assert normal.GetInput("file").Get().path == "./chair_normal.png"
    base = UsdShade.Shader(surface.GetInput("diffuseColor").GetConnectedSources()[0][0].source.GetPrim())
    assert base.GetInput("sourceColorSpace").Get() == "sRGB"
    assert base.GetInput("file").Get().path == "./chair_basecolor.png"


@needs_usd
def test_usdz_is_one_validated_package(asset, tmp_path):
    path = export_mesh(tmp_path / "chair.usdz", asset, name="chair", sidecar={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chair.json", "chair.usdz"]  # no temporary folder left
    assert usd_errors(path) == []
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert names[0] == "chair.usdc" and sorted(names[1:]) == ["chair_basecolor.png", "chair_normal.png"]
        np.testing.assert_array_equal(png_array(z.read("chair_normal.png")), asset.normal_map)

