"""Image to 3D from references rendered as an artist would (Blender defaults), measured case by case.

    python tests/pipelines/reference_matrix.py OUT_DIR [shape,...] [elevation,...] [background,...]

Each case renders a reference with real Blender (``blender_reference.py``, child process),
runs the draft image-to-3D pipeline on it, and measures the mesh: the texture's hue, the
shape measures of :mod:`engine_server.pipelines.quality`, the bumpiness (dihedral ratio),
the views' agreement and the reference camera used. A case passes when the colour is right,
its shape's measure is on the right side of the other shapes' in the same (elevation,
background) cell, and the surface is smooth (dihedral ratio <= 2). Prints a markdown table
and writes ``results.json`` beside the GLBs.
"""
from __future__ import annotations

import colorsys
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RENDER = Path(__file__).resolve().parent / "blender_reference.py"

SHAPES = {"sphere": (0.05, 0.12, 0.8), "cube": (0.8, 0.05, 0.04), "cone": (0.1, 0.6, 0.08)}
"""Shape -> linear base colour (blue, red, green)."""
HUES = {"sphere": 225.0, "cube": 0.0, "cone": 120.0}
"""Shape -> hue of its colour, degrees; the result's texture must be within :data:`HUE_TOLERANCE` of it."""
HUE_TOLERANCE = 35.0
MEASURE = {"sphere": ("sphericity", 1), "cube": ("fill", 1), "cone": ("taper", -1)}
"""Shape -> (the measure telling it from the others, +1: it has the largest, -1: the smallest)."""
ELEVATIONS = (0.0, 20.0, 40.0)
BACKGROUNDS = ("grey", "gradient", "transparent")
ENGINES = {"grey": "workbench", "gradient": "eevee", "transparent": "eevee", "white": "workbench"}
"""Background -> the render engine used for it (both engines appear in the matrix)."""
AZIMUTH = 46.7
"""Blender's default camera azimuth."""


def render(out_dir: Path, shape: str, elevation: float, background: str, size: int = 256) -> Path:
    """Render one reference PNG with Blender in a child process."""
    name = f"{shape}_{background}_{elevation:g}"
    spec = {"shape": shape, "color": list(SHAPES[shape]), "elevation_deg": elevation, "azimuth_deg": AZIMUTH,
            "engine": ENGINES[background], "background": background, "size": size}
    spec_path, out = out_dir / f"{name}.json", out_dir / f"{name}.png"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(RENDER), str(spec_path), str(out)], capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"Blender render of {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return out


def texture_hue(result) -> tuple[float, float]:
    """Hue (degrees) and saturation of the texture's median colour under the mesh."""
    from engine_server.pipelines.quality import dominant_color

    rgb = dominant_color(result.texture, result.uvs, result.faces)
    hue, _, sat = colorsys.rgb_to_hls(*rgb)
    return hue * 360.0, sat


def run_case(prior, out_dir: Path, shape: str, elevation: float, background: str, overrides=None) -> dict:
    """Render, reconstruct with the draft preset, measure. Returns the case's row (without the pass verdict)."""
    from engine_server.geometry.mesh_utils import dihedral_ratio
    from engine_server.pipelines.image_to_3d import ImageTo3D, ImageTo3DRequest
    from engine_server.pipelines.quality import shape_measures

    ref = render(out_dir, shape, elevation, background)
    t0 = time.perf_counter()
    pipe = ImageTo3D(ImageTo3DRequest(image=ref, seed=0, preset="draft", overrides=dict(overrides or {})),
                     prior=prior)
    result = pipe.run(ref.with_suffix(".glb"))
    m = shape_measures(result.vertices, result.faces)
    hue, sat = texture_hue(result)
    side = json.loads(result.glb_path.with_suffix(".json").read_text())
    camera = side["reference"].get("camera", {})
    return {"shape": shape, "elevation": elevation, "background": background, "engine": ENGINES[background],
            "hue": round(hue, 1), "saturation": round(sat, 2),
            "colour_ok": bool(abs((hue - HUES[shape] + 180.0) % 360.0 - 180.0) <= HUE_TOLERANCE and sat > 0.25),
            **{k: round(m[k], 3) for k in ("sphericity", "fill", "taper", "extent_ratio")},
            "dihedral_ratio": round(dihedral_ratio(result.vertices, result.faces), 2), "faces": len(result.faces),
            "agreement_min": round(float(min(side["views"]["agreement"])), 3),
            "camera_source": camera.get("source"), "camera_elevation": camera.get("elevation_deg"),
            "seconds": round(time.perf_counter() - t0, 1)}


def judge(rows: list[dict]) -> list[dict]:
    """Add "shape_ok", "smooth_ok" and "pass" to each row: shape measured against the other shapes' in its cell."""
    for row in rows:
        key, sign = MEASURE[row["shape"]]
        others = [r[key] for r in rows if r["shape"] != row["shape"] and r["elevation"] == row["elevation"]
                  and r["background"] == row["background"]]
        row["shape_ok"] = bool(others) and all(sign * (row[key] - o) > 0 for o in others)
        row["smooth_ok"] = row["dihedral_ratio"] <= 2.0
        row["pass"] = row["colour_ok"] and row["shape_ok"] and row["smooth_ok"]
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    cols = ["shape", "elevation", "background", "engine", "camera_source", "camera_elevation", "hue", "sphericity",
            "fill", "taper", "dihedral_ratio", "agreement_min", "colour_ok", "shape_ok", "smooth_ok", "pass"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    passed = sum(r["pass"] for r in rows)
    lines.append(f"\n{passed}/{len(rows)} cases pass ({passed / max(len(rows), 1):.0%})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import torch

    from engine_server.guidance import load_prior

    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = argv[1].split(",") if len(argv) > 1 else list(SHAPES)
    elevations = [float(e) for e in argv[2].split(",")] if len(argv) > 2 else list(ELEVATIONS)
    backgrounds = argv[3].split(",") if len(argv) > 3 else list(BACKGROUNDS)
    torch.set_num_threads(1)
    prior = load_prior("bundled")
    rows = []
    for background in backgrounds:
        for elevation in elevations:
            for shape in shapes:
                try:
                    rows.append(run_case(prior, out_dir, shape, elevation, background))
                except Exception as exc:  # a failed case is a row of the table, not the end of the run
                    rows.append({"shape": shape, "elevation": elevation, "background": background,
                                 "engine": ENGINES[background], "error": str(exc).splitlines()[0],
                                 "colour_ok": False, "sphericity": np.nan, "fill": np.nan, "taper": np.nan,
                                 "dihedral_ratio": np.inf})
                print(json.dumps(rows[-1]), flush=True)
    judge(rows)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
