"""The reference camera's estimate against the truth over Blender renders (no image-to-3D run: ~10 s a case).

    python tests/multiview/reference_cameras.py OUT_DIR

Renders, with real Blender in one child process (``tests/pipelines/blender_reference.py``), the
three shapes of the image-to-3D matrix at elevations 0, 20 and 40 degrees on grey (Workbench),
gradient and transparent (EEVEE) backgrounds with Blender's default 50 mm lens, and on grey with
a 35 mm lens; prepares each as the pipeline does and estimates its camera. The truth: the render's
elevation, and the distance at the estimate's FOV at which the unit-box object fills the prepared
frame as it fills the render's cut (Blender's camera is 11.23 m from a 2 m object; the cut narrows
its frame). Prints a row per case and the mean / max errors, and writes ``cameras.json``.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

RENDER = Path(__file__).resolve().parents[1] / "pipelines" / "blender_reference.py"
SHAPES = {"sphere": (0.05, 0.12, 0.8), "cube": (0.8, 0.05, 0.04), "cone": (0.1, 0.6, 0.08)}
"""Shape -> linear base colour, as the image-to-3D matrix renders them."""
ENGINES = {"grey": "workbench", "gradient": "eevee", "transparent": "eevee"}
AZIMUTH = 46.7
"""Blender's default camera azimuth."""
CAMERA_DISTANCE = 11.23
"""Blender's default camera distance, metres (``blender_reference.DEFAULT_CAMERA_DISTANCE``)."""
OBJECT_SIZE = 2.0
"""Largest side of the rendered primitives, metres: the engine's unit box."""
SENSOR = 36.0
"""Sensor width, mm (a square render's FOV is the sensor's)."""


def cases() -> list[dict]:
    """Render specs: 3 shapes x 3 elevations x 3 backgrounds at 50 mm, and 3 x 3 on grey at 35 mm."""
    out = []
    for lens, backgrounds in ((50.0, ("grey", "gradient", "transparent")), (35.0, ("grey",))):
        for background in backgrounds:
            for elevation in (0.0, 20.0, 40.0):
                for shape, colour in SHAPES.items():
                    out.append({"shape": shape, "color": list(colour), "elevation_deg": elevation,
                                "azimuth_deg": AZIMUTH, "engine": ENGINES[background], "background": background,
                                "size": 256, "lens_mm": lens})
    return out


def render_all(out_dir: Path, specs: list[dict]) -> list[Path]:
    """Render every spec not rendered yet in one Blender child process; the PNGs' paths."""
    pairs, pngs = [], []
    for s in specs:
        name = f"{s['shape']}_{s['background']}_{s['elevation_deg']:g}_{s['lens_mm']:g}mm"
        spec_path, png = out_dir / f"{name}.json", out_dir / f"{name}.png"
        pngs.append(png)
        if not png.is_file() or not spec_path.is_file() or json.loads(spec_path.read_text()) != s:
            spec_path.write_text(json.dumps(s))
            pairs.append((str(spec_path), str(png)))
    if not pairs:
        return pngs
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import blender_reference as b\n"
            "for spec, out in json.loads(sys.argv[2]): b.main(spec, out)")
    proc = subprocess.run([sys.executable, "-c", code, str(RENDER.parent), json.dumps(pairs)], capture_output=True,
                          text=True, timeout=1800, check=False)
    missing = [p for _, p in pairs if not Path(p).is_file()]
    if proc.returncode != 0 or missing:
        raise RuntimeError(f"Blender renders failed ({len(missing)} missing):\n{proc.stderr[-2000:]}")
    return pngs


def true_distance(spec: dict, mask, fov_y_deg: float) -> float:
    """Distance, in unit-box units at vertical FOV ``fov_y_deg``, at which the object fills the prepared frame
    as it fills the render's cut (``reference.framing``) of the render (mask (H, W))."""
    from engine_server.multiview.reference import framing

    _, _, side = framing(mask)
    half = CAMERA_DISTANCE / OBJECT_SIZE * (SENSOR / 2 / spec["lens_mm"]) * side / mask.shape[0]
    return half / math.tan(math.radians(fov_y_deg) / 2)


def measure(prior, png: Path, spec: dict) -> dict:
    """Prepare the render as the pipeline does, estimate its camera, compare with the truth."""
    from engine_server.guidance import prior_defaults
    from engine_server.multiview import DEFAULT_ELEVATION
    from engine_server.multiview.reference import (
        estimate_reference_camera,
        matte_reference,
        prepare_matte,
        read_image,
    )

    defaults = prior_defaults(prior)
    ranges = defaults.camera_ranges
    m = matte_reference(read_image(png))
    image, _ = prepare_matte(m, defaults.background_rgb, prior.resolution)
    cam = estimate_reference_camera(prior, image, float(ranges["default_distance"]), float(ranges["default_fov"]),
                                    DEFAULT_ELEVATION, coverage=m.rgba[..., 3])
    truth = true_distance(spec, m.mask, cam.fov_y_deg)
    turn = abs(cam.azimuth_deg - spec["azimuth_deg"]) % 90.0  # a box looks the same every 90 degrees
    return {"case": png.stem, "elevation": spec["elevation_deg"], "found_elevation": round(cam.elevation_deg, 1),
            "elevation_error": round(abs(cam.elevation_deg - spec["elevation_deg"]), 1), "azimuth": cam.azimuth_deg,
            "azimuth_error": round(min(turn, 90.0 - turn), 1) if spec["shape"] == "cube" else None,
            "distance": round(cam.distance, 3), "true_distance": round(truth, 3),
            "distance_error": round(abs(cam.distance - truth) / truth, 3), "source": cam.source}


def summary(rows: list[dict]) -> str:
    """Mean / max elevation error (degrees) and relative distance error, overall and per lens."""
    lines = []
    for label, sel in (("all", rows), ("50 mm", [r for r in rows if r["case"].endswith("_50mm")]),
                       ("35 mm", [r for r in rows if r["case"].endswith("_35mm")])):
        if not sel:
            continue
        el = [r["elevation_error"] for r in sel]
        d = [r["distance_error"] for r in sel]
        lines.append(f"{label} ({len(sel)}): elevation error mean {sum(el) / len(el):.1f} max {max(el):.0f} deg; "
                     f"distance error mean {sum(d) / len(d):.0%} max {max(d):.0%}")
    for shape in ("sphere", "cube", "cone"):
        sel = [r for r in rows if r["case"].startswith(shape)]
        if sel:
            el = [r["elevation_error"] for r in sel]
            d = [r["distance_error"] for r in sel]
            az = [r["azimuth_error"] for r in sel if r["azimuth_error"] is not None]
            lines.append(f"{shape} ({len(sel)}): elevation error mean {sum(el) / len(el):.1f} max {max(el):.0f} deg; "
                         f"distance error mean {sum(d) / len(d):.0%} max {max(d):.0%}"
                         + (f"; azimuth error (mod 90) mean {sum(az) / len(az):.1f} max {max(az):.0f} deg"
                            if az else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import torch

    from engine_server.guidance import load_prior

    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = cases()
    pngs = render_all(out_dir, specs)
    torch.set_num_threads(1)
    prior = load_prior("bundled")
    rows = []
    for png, spec in zip(pngs, specs):
        rows.append(measure(prior, png, spec))
        print(json.dumps(rows[-1]), flush=True)
    (out_dir / "cameras.json").write_text(json.dumps(rows, indent=1))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
