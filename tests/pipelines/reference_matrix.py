"""Image to 3D from references rendered as an artist would (Blender defaults), measured case by case.

    python tests/pipelines/reference_matrix.py OUT_DIR [shape,...] [elevation,...] [background,...]
    python tests/pipelines/reference_matrix.py --stages OUT_DIR [shape:background:elevation,...] [stage,...] [seed]
    python tests/pipelines/reference_matrix.py --picture OUT_DIR PICTURE.png [shape:background:elevation,...]

Each case renders a reference with real Blender (``blender_reference.py``, child process),
runs the draft image-to-3D pipeline on it, and measures the mesh: the texture's hue, the
shape measures of :mod:`engine_server.pipelines.quality`, the bumpiness (dihedral ratio),
the views' agreement and the reference camera used. A case passes when the colour is right,
its shape's measure is on the right side of the other shapes' in the same (elevation,
background) cell, and the surface is smooth (dihedral ratio <= 2). Prints a markdown table
and writes ``results.json`` beside the GLBs.

``--picture`` tiles references of a finished matrix run (default :data:`PICTURE_CASES`) beside their results,
each rendered by Blender as its reference was (same camera, light and background; the result turned so the
reference camera sees it from where the engine put that camera).

``--stages`` compares the DreamCraft3D stages of issue 25 on a few references (default
:data:`STAGE_CASES`), each with the prompt naming its shape and colour: (a) the novel-view prior
alone, (b) hybrid distillation, (c) hybrid + progressive views + geometry alignment
(:data:`STAGES`). Each result is measured against the true object (Blender's primitive, turned
so the reference camera sits where the engine put it, both in a unit box) at held-out views
(:data:`HELD_OUT`, none near the reference): silhouette IoU, colour error (mean absolute sRGB
difference on the pixels both cover) and the dihedral ratio. Writes ``stages_<stages>.json``.
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


def blender(spec: dict, out: Path) -> Path:
    """Render ``spec`` (see ``blender_reference.py``) to the PNG ``out`` with Blender in a child process."""
    spec_path = out.with_name(f"{out.stem}_spec.json")
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(RENDER), str(spec_path), str(out)], capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"Blender render of {out.stem} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return out


def reference_spec(shape: str, elevation: float, background: str, size: int = 256) -> dict:
    """The Blender render spec of one reference."""
    return {"shape": shape, "color": list(SHAPES[shape]), "elevation_deg": elevation, "azimuth_deg": AZIMUTH,
            "engine": ENGINES[background], "background": background, "size": size}


def render(out_dir: Path, shape: str, elevation: float, background: str, size: int = 256) -> Path:
    """Render one reference PNG with Blender in a child process."""
    out = out_dir / f"{shape}_{background}_{elevation:g}.png"
    return blender(reference_spec(shape, elevation, background, size), out)


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


PICTURE_CASES = (("sphere", "grey", 0.0), ("cube", "transparent", 40.0), ("cone", "gradient", 20.0))
"""(shape, background, elevation) of the README's picture: every shape, elevation and background once."""


def picture(out_dir: Path, cases, path: Path, grey: float = 0.22) -> Path:
    """Rows of (reference, result) PNGs for finished ``cases`` of ``out_dir``; transparent film shown on ``grey``."""
    from PIL import Image

    tiles = []
    for shape, background, elevation in cases:
        name = f"{shape}_{background}_{elevation:g}"
        side = json.loads((out_dir / f"{name}.json").read_text())  # the result's sidecar
        spec = {**reference_spec(shape, elevation, background), "mesh": str(out_dir / f"{name}.glb"),
                "turn_deg": AZIMUTH - side["reference"]["camera"]["azimuth_deg"]}
        out = blender(spec, out_dir / f"{name}_result.png")
        row = []
        for png in (out_dir / f"{name}.png", out):
            im = Image.open(png).convert("RGBA")
            flat = Image.new("RGBA", im.size, (round(255 * grey),) * 3 + (255,))
            row.append(Image.alpha_composite(flat, im).convert("RGB"))
        tiles.append(row)
    w, h = tiles[0][0].size
    sheet = Image.new("RGB", (2 * w, h * len(tiles)))
    for i, row in enumerate(tiles):
        for j, im in enumerate(row):
            sheet.paste(im.resize((w, h)), (j * w, i * h))
    sheet.save(path)
    return path


PROMPTS = {"sphere": "a blue sphere", "cube": "a red cube", "cone": "a green cone"}
"""Shape -> the prompt of its stage comparison (the bundled prior's words)."""
STAGE_CASES = (("sphere", "grey", 20.0), ("cube", "transparent", 20.0), ("cone", "gradient", 0.0))
"""(shape, background, elevation) of the default stage comparison."""
_A = {"hybrid": False, "view_start_range": None, "depth_weight": 0.0, "normal_weight": 0.0}
STAGES = {
    "a": _A,
    "b": {**_A, "hybrid": True},
    "c": {"hybrid": True, "view_start_range": 30.0, "depth_weight": 0.5, "normal_weight": 1.0},
    "d": {"hybrid": True, "view_start_range": 30.0, "depth_weight": 0.5, "normal_weight": 1.0, "bsd_steps": 100},
    "a+align": {**_A, "depth_weight": 0.5, "normal_weight": 1.0},
    "a+views": {**_A, "view_start_range": 30.0},
    "a+normal": {**_A, "normal_weight": 1.0},
}
"""Stage name -> ImageFitConfig fields: (a) novel-view prior alone, (b) hybrid, (c) hybrid + progressive + alignment,
(d) (c) + bootstrapped score distillation (100 steps after the draft's 200 coarse ones: four rounds, t' 0.6 -> 0.3);
"a+align", "a+views" and "a+normal" (one part of (c) without the hybrid) tell which part of (c) does what."""
HELD_OUT = tuple((az, el) for el in (10.0, 35.0) for az in (60.0, 120.0, 180.0, 240.0, 300.0))
"""(azimuth, elevation) of the held-out views, degrees from the reference camera's azimuth."""


def true_mesh(shape: str, turn_deg: float):
    """Blender's primitive of ``shape`` turned ``turn_deg`` about Z, in a unit box centred at the origin."""
    import trimesh

    if shape == "cube":
        mesh = trimesh.creation.box((2.0, 2.0, 2.0))
    elif shape == "sphere":
        mesh = trimesh.creation.icosphere(4, radius=1.0)
    elif shape == "cone":
        mesh = trimesh.creation.cone(radius=1.0, height=2.0, sections=64)
    else:
        raise ValueError(f"no true mesh for {shape!r}")
    mesh.apply_transform(trimesh.transformations.rotation_matrix(np.radians(turn_deg), (0, 0, 1)))
    v = np.asarray(mesh.vertices, dtype=np.float32)
    lo, hi = v.min(0), v.max(0)
    return (v - 0.5 * (lo + hi)) / float((hi - lo).max()), np.asarray(mesh.faces, dtype=np.int64)


def srgb(linear) -> np.ndarray:
    """Linear RGB -> sRGB-encoded values in [0, 1]."""
    c = np.clip(np.asarray(linear, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


def held_out_scores(result, shape: str, reference_azimuth: float, size: int = 64) -> dict:
    """Silhouette IoU and colour error of a result against the true object at :data:`HELD_OUT` views."""
    import torch

    from engine_server.cameras import look_at, orbit_position
    from engine_server.multiview import mask_iou
    from kernels.rasterize import render_mesh

    # The engine put the reference camera at ``reference_azimuth``; Blender's was at AZIMUTH.
    tv, tf = true_mesh(shape, reference_azimuth - AZIMUTH)
    c2w = torch.stack([look_at(orbit_position(reference_azimuth + az, el, 2.5)) for az, el in HELD_OUT])
    truth = render_mesh(torch.from_numpy(tv), torch.from_numpy(tf), c2w, 30.0, size, size)
    uv = np.asarray(result.mesh.uvs, dtype=np.float32).copy()
    uv[:, 1] = 1.0 - uv[:, 1]  # glTF (top-left origin) -> the rasterizer's (v up)
    tex = torch.from_numpy(np.asarray(result.mesh.base_color)[..., :3].astype(np.float32) / 255.0)
    made = render_mesh(torch.as_tensor(result.vertices, dtype=torch.float32), torch.as_tensor(result.faces),
                       c2w, 30.0, size, size, uv=torch.from_numpy(uv), texture=tex)
    a, b = made["mask"][..., 0] > 0.5, truth["mask"][..., 0] > 0.5
    both = a & b
    colour = torch.as_tensor(srgb(SHAPES[shape]), dtype=torch.float32)
    err = (made["rgb"] - colour).abs().mean(-1)[both]
    return {"iou": round(float(mask_iou(a, b).mean()), 3), "colour_error": round(float(err.mean()), 3)}


def run_stage(prior, out_dir: Path, shape: str, background: str, elevation: float, stage: str, seed: int = 0) -> dict:
    """One reference through one stage configuration; its row of the comparison."""
    from engine_server.geometry.mesh_utils import dihedral_ratio
    from engine_server.pipelines.image_to_3d import ImageFitConfig, ImageTo3D, ImageTo3DRequest

    ref = out_dir / f"{shape}_{background}_{elevation:g}.png"
    if not ref.is_file():
        ref = render(out_dir, shape, elevation, background)
    t0 = time.perf_counter()
    pipe = ImageTo3D(ImageTo3DRequest(image=ref, prompt=PROMPTS[shape], seed=seed, preset="draft",
                                      fit=ImageFitConfig(**STAGES[stage])), prior=prior)
    result = pipe.run(out_dir / f"{ref.stem}_{stage}_{seed}.glb")
    az = float(pipe.reference_camera.azimuth_deg)
    return {"shape": shape, "background": background, "elevation": elevation, "stage": stage, "seed": seed,
            **held_out_scores(result, shape, az),
            "dihedral_ratio": round(dihedral_ratio(result.vertices, result.faces), 2),
            "camera_elevation": round(float(pipe.reference_camera.elevation_deg), 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def stage_table(rows: list[dict]) -> str:
    """The comparison as a markdown table, per reference and stage, with each stage's mean."""
    cols = ["shape", "background", "elevation", "stage", "seed", "iou", "colour_error", "dihedral_ratio", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    lines += ["", "| stage | mean IoU | mean colour error | mean dihedral ratio |", "|---|---|---|---|"]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        part = [r for r in rows if r["stage"] == stage and "iou" in r]
        if part:
            lines.append(f"| {stage} | {np.mean([r['iou'] for r in part]):.3f} | "
                         f"{np.mean([r['colour_error'] for r in part]):.3f} | "
                         f"{np.mean([r['dihedral_ratio'] for r in part]):.2f} |")
    return "\n".join(lines)


def main_stages(argv: list[str]) -> int:
    import torch

    from engine_server.guidance import load_prior

    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [(s, b, float(e)) for s, b, e in (c.split(":") for c in argv[1].split(","))] \
        if len(argv) > 1 and argv[1] else list(STAGE_CASES)
    stages = argv[2].split(",") if len(argv) > 2 else ["a", "b", "c"]
    seed = int(argv[3]) if len(argv) > 3 else 0
    torch.set_num_threads(1)
    prior = load_prior("bundled")
    rows = []
    for case in cases:
        for stage in stages:
            try:
                rows.append(run_stage(prior, out_dir, *case, stage, seed))
            except Exception as exc:  # a failed run is a row of the table, not the end of the comparison
                rows.append({"shape": case[0], "background": case[1], "elevation": case[2], "stage": stage,
                             "error": str(exc).splitlines()[0]})
            print(json.dumps(rows[-1]), flush=True)
            (out_dir / f"stages_{'_'.join(stages)}_{seed}.json").write_text(json.dumps(rows, indent=1))
    print(stage_table(rows))
    return 0


def main(argv: list[str]) -> int:
    import torch

    if argv and argv[0] == "--stages":
        return main_stages(argv[1:])
    if argv and argv[0] == "--picture":
        cases = [(sh, b, float(e)) for sh, b, e in (c.split(":") for c in argv[3].split(","))] \
            if len(argv) > 3 else list(PICTURE_CASES)
        print(picture(Path(argv[1]), cases, Path(argv[2])))
        return 0

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
