"""Build the Blender add-on zips: a 4.2+ extension (pyzmq wheels bundled) and a legacy add-on for older Blender.

    python build_addon.py                  # dist/generate_3d-<version>.zip (+ -legacy.zip), wheels from PyPI
    python build_addon.py --no-wheels      # offline and fast: pyzmq must already be importable in Blender
    python build_addon.py --wheel-dir DIR  # use the pyzmq wheels already in DIR

The engine's wire package (``engine_server/wire/``: auth, protocol, client) is copied
into the zip as the subpackage ``engine_client`` with its ``engine_server.wire``
imports made relative, so the add-on and the engine share one source and never drift.

Wheels: ``pip download --only-binary=:all: --python-version 3.11 pyzmq`` for each of
Blender's platforms (linux-x64, windows-x64, macos-arm64, macos-x64; pyzmq ships one
universal2 wheel for both Macs), cached in ``build/addon-wheels`` and listed in the
manifest's ``wheels``. The legacy zip has no wheel mechanism: its Blender must find
pyzmq on its own ``sys.path`` (e.g. ``PYTHONPATH``).
"""
from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
ADDON_DIR = ROOT / "blender_addon"
WIRE_DIR = ROOT / "engine_server" / "wire"
"""The torch-free, bpy-free package the add-on carries."""
CLIENT_PACKAGE = "engine_client"
"""Name of the subpackage holding the copied engine modules inside the add-on."""
PYTHON_VERSION = "3.11"
"""Blender 4.2 to 5.x's Python."""
PLATFORM_TAGS: dict[str, list[str]] = {
    "linux-x64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
    "windows-x64": ["win_amd64"],
    "macos-arm64": ["macosx_11_0_arm64"],
    "macos-x64": ["macosx_10_15_x86_64"],
}
"""Blender platform -> pip ``--platform`` tags to ask for."""
WHEEL_PLATFORMS: dict[str, tuple[str, ...]] = {
    "linux-x64": ("linux_x86_64", "manylinux"),
    "windows-x64": ("win_amd64",),
    "macos-arm64": ("arm64", "universal2"),
    "macos-x64": ("x86_64", "universal2", "intel"),
}
"""Blender platform -> substrings of a wheel's platform tag that serve it."""
_IMPORT_RE = re.compile(r"^(\s*)from engine_server\.wire(\.\w+)? import ", re.M)


class BuildError(Exception):
    """The add-on cannot be built as asked; the message says why."""


@dataclass
class BuildResult:
    """What a build produced."""

    extension_zip: Path
    """The Blender 4.2+ extension zip."""
    legacy_zip: Path | None
    """The legacy add-on zip (folder ``<id>/`` with ``bl_info``), if built."""
    wheels: list[str] = field(default_factory=list)
    """Wheel file names bundled into the extension."""
    engine_modules: list[str] = field(default_factory=list)
    """engine_server modules copied into ``engine_client``."""


def read_manifest(path: Path = ADDON_DIR / "blender_manifest.toml") -> dict:
    """The add-on's manifest as a dict."""
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def engine_sources() -> dict[str, str]:
    """Every module of ``engine_server/wire`` (``name -> source``), imports rewritten relative to ``engine_client``."""
    out: dict[str, str] = {}
    for path in sorted(WIRE_DIR.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        rewritten = _IMPORT_RE.sub(lambda m: f"{m.group(1)}from .{(m.group(2) or '')[1:]} import ", text)
        if re.search(r"^\s*(import engine_server|from engine_server)", rewritten, re.M):
            raise BuildError(f"{path} imports engine_server outside the wire package; the add-on cannot carry it")
        if re.search(r"^\s*(import|from)\s+(torch|bpy)\b", rewritten, re.M):
            raise BuildError(f"{path} imports torch or bpy; the add-on cannot carry it")
        out[path.stem] = (f"# Copied from engine_server/wire/{path.name} by build_addon.py: edit the original, "
                          f"not this copy.\n" + rewritten)
    return out


def download_wheels(platforms: list[str], cache: Path, package: str = "pyzmq") -> list[Path]:
    """One wheel per platform for Blender's Python, from PyPI into ``cache`` (already there: reused)."""
    cache.mkdir(parents=True, exist_ok=True)
    for plat in platforms:
        if _pick(list(cache.glob(f"{package}-*.whl")), plat):
            continue
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", PYTHON_VERSION, "--implementation", "cp", "--dest", str(cache)]
        for tag in PLATFORM_TAGS[plat]:
            cmd += ["--platform", tag]
        cmd.append(package)
        logger.info("downloading %s for %s", package, plat)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise BuildError(f"pip download {package} for {plat} failed:\n{proc.stderr[-2000:]}")
    return _select(cache, platforms, package)


def _pick(wheels: list[Path], plat: str) -> Path | None:
    """The newest wheel in ``wheels`` for Blender platform ``plat`` and Python 3.11."""
    abi = "cp" + PYTHON_VERSION.replace(".", "")
    good = [w for w in wheels if (f"-{abi}-" in w.name or "-abi3-" in w.name)
            and any(s in w.name.rsplit("-", 1)[-1] for s in WHEEL_PLATFORMS[plat])]
    return max(good, key=lambda w: w.name) if good else None


def _select(folder: Path, platforms: list[str], package: str = "pyzmq") -> list[Path]:
    wheels = sorted(folder.glob(f"{package}-*.whl"))
    chosen: list[Path] = []
    for plat in platforms:
        wheel = _pick(wheels, plat)
        if wheel is None:
            raise BuildError(f"no {package} wheel for {plat} / Python {PYTHON_VERSION} in {folder}")
        if wheel not in chosen:
            chosen.append(wheel)
    return chosen


def _manifest_text(wheels: list[str], platforms: list[str]) -> str:
    text = (ADDON_DIR / "blender_manifest.toml").read_text(encoding="utf-8")
    listed = ", ".join(f'"./wheels/{w}"' for w in wheels)
    text = re.sub(r"^wheels\s*=.*$", f"wheels = [{listed}]" if wheels else "", text, flags=re.M)
    plats = ", ".join(f'"{p}"' for p in platforms)
    return re.sub(r"^platforms\s*=.*$", f"platforms = [{plats}]", text, flags=re.M)


def _addon_files() -> list[Path]:
    skip = {"bench.py"}  # a developer tool (runs bpy in a child process), not part of the add-on
    return sorted(p for p in ADDON_DIR.rglob("*.py")
                  if "__pycache__" not in p.parts and CLIENT_PACKAGE not in p.parts and p.name not in skip)


def build(out_dir: Path = ROOT / "dist", *, wheels: str | Path = "download", platforms: list[str] | None = None,
          legacy: bool = True) -> BuildResult:
    """Build the zips into ``out_dir``. ``wheels``: "download" (PyPI, cached), "none", or a folder of .whl files."""
    manifest = read_manifest()
    addon_id, version = manifest["id"], manifest["version"]
    platforms = list(platforms or PLATFORM_TAGS)
    unknown = [p for p in platforms if p not in PLATFORM_TAGS]
    if unknown:
        raise BuildError(f"unknown platform(s) {unknown}; known: {', '.join(PLATFORM_TAGS)}")
    if wheels == "download":
        wheel_files = download_wheels(platforms, ROOT / "build" / "addon-wheels")
    elif wheels == "none":
        wheel_files = []
    else:
        wheel_files = _select(Path(wheels), platforms)
    engine = engine_sources()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _addon_files()

    ext_zip = out_dir / f"{addon_id}-{version}.zip"
    with zipfile.ZipFile(ext_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("blender_manifest.toml", _manifest_text([w.name for w in wheel_files], platforms))
        for path in files:
            zf.write(path, path.relative_to(ADDON_DIR).as_posix())
        _write_engine(zf, "", engine)
        for wheel in wheel_files:
            zf.write(wheel, f"wheels/{wheel.name}")

    legacy_zip = None
    if legacy:
        legacy_zip = out_dir / f"{addon_id}-{version}-legacy.zip"
        with zipfile.ZipFile(legacy_zip, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in files:
                zf.write(path, f"{addon_id}/{path.relative_to(ADDON_DIR).as_posix()}")
            _write_engine(zf, f"{addon_id}/", engine)
    return BuildResult(ext_zip, legacy_zip, [w.name for w in wheel_files], sorted(engine))


def _write_engine(zf: zipfile.ZipFile, prefix: str, engine: dict[str, str]) -> None:
    for name, text in sorted(engine.items()):
        zf.writestr(f"{prefix}{CLIENT_PACKAGE}/{name}.py", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--no-wheels", action="store_true", help="bundle no pyzmq wheel (offline, fast)")
    group.add_argument("--wheel-dir", type=Path, help="take the pyzmq wheels from this folder instead of PyPI")
    p.add_argument("--platform", action="append", choices=list(PLATFORM_TAGS),
                   help="build for these platforms only (repeatable; default: all four)")
    p.add_argument("--no-legacy", action="store_true", help="skip the legacy (bl_info) zip")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wheels = "none" if args.no_wheels else (args.wheel_dir if args.wheel_dir else "download")
    try:
        result = build(args.out, wheels=wheels, platforms=args.platform, legacy=not args.no_legacy)
    except BuildError as exc:
        print(f"build_addon: {exc}", file=sys.stderr)
        return 1
    print(f"extension: {result.extension_zip}  (wheels: {', '.join(result.wheels) or 'none'})")
    if result.legacy_zip:
        print(f"legacy add-on: {result.legacy_zip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
