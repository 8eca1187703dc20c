"""build_addon.py: the zips carry the engine's own client modules, the manifest lists the wheels, legacy has bl_info."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile

import pytest

from .conftest import ROOT

import build_addon  # noqa: E402  (conftest put the repo root on sys.path)


def test_engine_client_is_the_engines_wire_package_with_relative_imports(addon_build):
    wire = sorted(p.stem for p in (ROOT / "engine_server" / "wire").glob("*.py"))
    with zipfile.ZipFile(addon_build.extension_zip) as zf:
        for name in wire:
            copied = zf.read(f"engine_client/{name}.py").decode()
            original = (ROOT / "engine_server" / "wire" / f"{name}.py").read_text()
            body = copied.split("\n", 1)[1]  # after the "copied from" header line
            restored = re.sub(r"^(\s*)from \.(\w+) import", r"\1from engine_server.wire.\2 import", body, flags=re.M)
            assert re.sub(r"^(\s*)from \. import", r"\1from engine_server.wire import", restored, flags=re.M) == original
            assert not re.search(r"^\s*(from|import) engine_server", copied, re.M)
    assert addon_build.engine_modules == wire
    assert {"auth", "client", "protocol"} <= set(wire)


def test_manifest_declares_network_and_lists_the_bundled_wheels(addon_build):
    with zipfile.ZipFile(addon_build.extension_zip) as zf:
        manifest = tomllib.loads(zf.read("blender_manifest.toml").decode())
        names = set(zf.namelist())
    assert manifest["id"] == "generate_3d" and manifest["blender_version_min"] >= "4.2.0"
    assert "network" in manifest["permissions"]
    assert manifest["wheels"] == [f"./wheels/{w}" for w in addon_build.wheels]
    assert all(w[2:] in names for w in manifest["wheels"])
    assert len(addon_build.wheels) == 1 and "cp311" in addon_build.wheels[0] and "x86_64" in addon_build.wheels[0]
    assert manifest["platforms"] == ["linux-x64"]
    assert addon_build.extension_zip.name == f"generate_3d-{manifest['version']}.zip"


def test_legacy_zip_is_one_folder_with_bl_info(addon_build):
    with zipfile.ZipFile(addon_build.legacy_zip) as zf:
        names = zf.namelist()
        init = zf.read("generate_3d/__init__.py").decode()
    assert all(n.startswith("generate_3d/") for n in names)
    assert "generate_3d/engine_client/client.py" in names
    assert "bl_info" in init and '"blender": (3, 4, 0)' in init


def test_bundled_client_imports_without_engine_server(addon_build, tmp_path):
    with zipfile.ZipFile(addon_build.legacy_zip) as zf:
        zf.extractall(tmp_path)
    code = ("import sys; from generate_3d.engine_client import client, protocol; "
            "assert 'engine_server' not in sys.modules, sorted(m for m in sys.modules if 'engine' in m); "
            "print(client.EngineClient.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "generate_3d.engine_client.client"


def test_wheel_selection_covers_each_platform_and_names_a_missing_one(tmp_path):
    for name in ("pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
                 "pyzmq-27.3.0-cp311-cp311-win_amd64.whl", "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl",
                 "pyzmq-27.3.0-cp312-cp312-win_amd64.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen = [w.name for w in build_addon._select(tmp_path, list(build_addon.PLATFORM_TAGS))]
    assert chosen == ["pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
                      "pyzmq-27.3.0-cp311-cp311-win_amd64.whl",
                      "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl"]  # one universal2 serves both Macs
    (tmp_path / "pyzmq-27.3.0-cp311-cp311-win_amd64.whl").unlink()
    with pytest.raises(build_addon.BuildError, match="windows-x64"):
        build_addon._select(tmp_path, list(build_addon.PLATFORM_TAGS))


def test_no_wheels_build_lists_none(tmp_path):
    result = build_addon.build(tmp_path, wheels="none", legacy=False)
    with zipfile.ZipFile(result.extension_zip) as zf:
        manifest = tomllib.loads(zf.read("blender_manifest.toml").decode())
        assert not any(n.startswith("wheels/") for n in zf.namelist())
    assert "wheels" not in manifest and result.legacy_zip is None
    assert manifest["platforms"] == list(build_addon.PLATFORM_TAGS)
