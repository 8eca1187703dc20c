"""``engine-server doctor --model PATH_OR_ID``: what was found, its defaults, what each preset needs, one timed step."""
from __future__ import annotations

import argparse
import json

from engine_server.cli.common import UsageError, add_model_config_flag, format_table, usage_from
from engine_server.pipelines.presets import PRESETS


def add_parsers(sub) -> None:
    p = sub.add_parser("doctor", help="check a prior: family, layout, variant, defaults, memory per preset, one step")
    p.add_argument("--model", default="bundled", metavar="PATH_OR_ID",
                   help="prior: bundled, a diffusers folder, a single-file checkpoint or a hub id")
    add_model_config_flag(p)
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="estimate this preset only (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print the same as one JSON object")
    p.set_defaults(func=cmd_doctor)


def diagnose(model: str, device: str = "auto", preset: str | None = None) -> dict:
    """Everything ``doctor`` reports, as one JSON-able dict (``UsageError`` when the prior does not load)."""
    from engine_server.devices import resolve_device
    from engine_server.guidance import PriorLoadError, load_prior
    from engine_server.guidance.diagnose import coarse_step_memory, describe_prior, measure_step, memory_estimate

    try:
        prior = load_prior(model, device=resolve_device(device))
    except PriorLoadError as exc:
        raise usage_from(exc) from None
    report = describe_prior(prior, model)
    names = [preset] if preset else list(PRESETS)
    step = measure_step(prior, PRESETS[names[0]].render_resolution)
    report["step"] = step
    ranges = report["defaults"]["camera_ranges"]
    report["presets"] = {}
    for name in names:
        p = PRESETS[name]
        size = p.render_resolution or step["render_size"]
        prior_gib = memory_estimate(report["parameters_gib"], step["saved_gib_per_view"],
                                    step["recompute_gib_per_view"], p.views_per_step, step["encode_chunk"])
        coarse = coarse_step_memory(p.hashgrid, p.samples_per_ray, size, p.views_per_step, p.occupancy_resolution,
                                    ranges.get("default_distance", 2.5), ranges.get("default_fov", 40.0),
                                    prior.device)
        report["presets"][name] = {
            "views_per_step": p.views_per_step, "render_size": size, "encoder_size": step["encoder_size"],
            "samples_per_ray": p.samples_per_ray, "prior_gib": prior_gib, **coarse,
            "estimate_gib": prior_gib + coarse["total_gib"],
        }
    report["estimate_covers"] = ("a lit coarse step at the full render size: the prior's weights, each view's saved "
                                 "activations and one chunk's recomputed encoder block; the field's weights, "
                                 "gradients and Adam moments; the renderer's activations on rays through the "
                                 "object's box; the occupancy grid")
    return report


def format_report(r: dict) -> str:
    """The report as aligned text."""
    d = r["defaults"]
    ranges = ", ".join(f"{k} {tuple(v) if isinstance(v, list) else v}" for k, v in d["camera_ranges"].items())
    ts = d["timesteps"]
    lines = [
        f"model       {r['model']}",
        f"source      {r['source']}",
        f"family      {r['family']} ({r['kind']}), {r['prediction_type']}, {r['resolution']} px",
        f"layout      {r['layout']}",
        *([f"config      {r['single_file_config']['config']} (SD {r['single_file_config']['family']}, chosen by "
           f"{r['single_file_config']['chosen_by']}), {r['prediction_type']}"] if r.get("single_file_config") else []),
        f"variants    {', '.join(f'{c}: {v}' for c, v in r['variants'].items()) or '-'}",
        f"dtype       {r['dtype']} on {r['device']}, {r['parameters_gib']:.3f} GiB of weights",
        "defaults    guidance scale " + ", ".join(f"{m} {s:g}" for m, s in d["guidance_scale"].items())
        + "".join(f", {k} stage {s:g}" for k, s in d["stage_guidance_scale"].items()),
        f"            timesteps {tuple(ts['start'])} -> {tuple(ts['end'])} over {ts['anneal_fraction']:g} of the run",
        f"            background {'learned' if d['background_rgb'] is None else tuple(d['background_rgb'])}, "
        f"render size {min(d['render_size'] or r['resolution'], r['resolution'])} px (upsampled to "
        f"{r['resolution']} px for the encoder)",
        f"            cameras {ranges or 'the engine defaults'}",
        f"            from {d['anchor']}",
    ]
    s = r["step"]
    peak = f", peak {s['peak_gib']:.2f} GiB" if s["peak_gib"] is not None else ""
    lines.append(f"step        {s['views']} view(s) at {s['render_size']} px -> {s['encoder_size']} px: "
                 f"{s['seconds']:.2f} s, {s['saved_gib_per_view']:.3f} GiB saved + "
                 f"{s['recompute_gib_per_view']:.3f} GiB "
                 f"recomputed per chunk of {s['encode_chunk']}{peak}, "
                 f"gradient {'finite' if s['finite'] else 'NOT FINITE'}")
    rows = [{"preset": n, "views/step": p["views_per_step"], "render px": p["render_size"],
             "encoder px": p["encoder_size"], "samples/ray": p["samples_per_ray"],
             "prior GiB": round(p["prior_gib"], 3), "field GiB": round(p["field_gib"], 3),
             "render GiB": round(p["render_gib"], 3), "occupancy GiB": round(p["occupancy_gib"], 4),
             "estimate GiB": round(p["estimate_gib"], 3)}
            for n, p in r["presets"].items()]
    lines += ["", format_table(rows), f"({r['estimate_covers']})"]
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    report = diagnose(args.model, args.device, args.preset)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if not report["step"]["finite"]:
        raise UsageError("the guidance step gave a non-finite gradient")
    return 0
