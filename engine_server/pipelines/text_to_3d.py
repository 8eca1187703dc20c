"""Text to 3D: prompt -> score distillation on a hash-grid field -> marching tetrahedra -> textured GLB.

Stages, each reporting through one progress callback:
  coarse   optimise the radiance field with SDS / VSD from the prior, rendering
           random views around the object (or near the request's rig cameras) within
           the prior's camera ranges; shading augmentation (DreamFusion): a share of the
           steps is lit by deferred shading of the composited normals, with the prior's
           own world-fixed lights when it declares them (``prior.lighting``), so the
           albedo is the object's colour and the shading carries its shape; opacity
           sparsity, a penalty on matter of the prior's plain background colour (which renders
           as no matter: :meth:`TextTo3D.background_matter`) and an optional orientation
           penalty on lit steps; the render size grows
           from ``preset.progressive_start`` to the full size over the first steps;
  extract  marching tetrahedra on the field's density (less its background-coloured share) at a threshold found from
           the density statistics (Otsu's method on log-density), tunnels a cell or two wide
           closed (:func:`close_tunnels`), then cleanup;
  texture  the extraction smoothed (edges kept), decimated to the preset's ``faces``, unwrapped
           (xatlas), albedo (as renders see it: composited along the inward normal,
           :func:`~engine_server.field.surface_albedo`) and a tangent-space normal map baked from the
           full-resolution surface (:func:`~engine_server.texture.asset.build_asset`);
  export   one TexturedMesh written by ``export_mesh`` (GLB, or the extension's format) + JSON sidecar.
The coarse stage checkpoints (field, optimizer, RNG, step) so a job can resume.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine_server.cameras import Camera, CameraSampler, look_at, orbit_position
from engine_server.field import (
    FieldConfig,
    FixedBackground,
    MLPBackground,
    OccupancyConfig,
    OccupancyGrid,
    RadianceField,
    RendererConfig,
    VolumeRenderer,
)
from engine_server.pipelines.base import JobPipeline, PipelineResult, to_uint8
from engine_server.pipelines.events import ProgressEvent
from engine_server.pipelines.loop import StepLoop
from engine_server.pipelines.optim import Adam
from engine_server.pipelines.presets import DEFAULT_PRESET, Preset, get_preset

logger = logging.getLogger(__name__)


@dataclass
class TextTo3DRequest:
    """One text-to-3D job."""

    prompt: str
    """What to make."""
    negative_prompt: str = ""
    """What to avoid (classifier-free guidance's unconditional branch)."""
    seed: int = 0
    """Seed of every random choice: same seed, preset and machine give the same mesh."""
    preset: str = DEFAULT_PRESET
    """Preset name (draft | standard | high)."""
    model: str = "bundled"
    """Prior: "bundled", a local diffusers folder or a hub id."""
    guidance: str = "sds"
    """Distillation mode: "sds" or "vsd"."""
    overrides: dict = field(default_factory=dict)
    """Preset values to override, e.g. {"coarse_steps": 100}."""
    rig: list[Camera] | None = None
    """Cameras to concentrate views around (Blender matrix_world + FOV); None: all around."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale; None: the prior's recommended scale for the mode (and stage)."""
    perp_neg: bool = False
    """Perp-Neg against the Janus problem (text-to-image priors: the neighbouring views' prompts as
    perpendicular negatives; two extra denoiser passes per step)."""


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample: the cut that maximises the between-class variance."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return hi
    hist = torch.histc(values.float(), bins=bins, min=lo, max=hi).double()
    centers = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centers = 0.5 * (centers[1:] + centers[:-1])
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centers).cumsum(0) / w0.clamp_min(1e-12)
    m1 = ((hist * centers).sum() - (hist * centers).cumsum(0)) / w1.clamp_min(1e-12)
    between = (w0 * w1 * (m0 - m1) ** 2)[:-1]
    # Every cut inside an empty gap scores the same: take the middle of the best plateau.
    best = torch.nonzero(between >= between.max() * (1 - 1e-9)).flatten()
    k_lo, k_hi = int(best.min()), int(best.max())
    return float(0.5 * (centers[k_lo] + centers[k_hi + 1]))


def close_tunnels(density: torch.Tensor, threshold: float, resolution: int) -> torch.Tensor:
    """Density (N,) on the tet grid's (R+1)^3 lattice with tunnels and gaps up to two cells wide filled.

    A morphological closing (3x3x3) of the cells above ``threshold``: the noise of a distilled field's
    level set makes small handles (issue 23: a cone and a pyramid of genus 2) that no object has; a
    torus's hole, many cells wide, stays open.
    """
    n = resolution + 1
    inside = (density > threshold).to(density.dtype).view(1, 1, n, n, n)
    closed = -torch.nn.functional.max_pool3d(-torch.nn.functional.max_pool3d(inside, 3, 1, 1), 3, 1, 1)
    fill = (closed.view(-1) > 0.5) & (density <= threshold)
    return torch.where(fill, torch.full_like(density, 1.5 * threshold), density)


class TextTo3D(JobPipeline):
    """The text-to-3D pipeline. ``run(out_path)`` does every stage and writes the GLB.

    Its coarse stage is a :class:`~engine_server.pipelines.loop.Trainable`: ``training_step``
    (occupancy update + ``coarse_loss``), the field's state and a preview render.
    """

    STAGES = ("coarse", "extract", "refine", "texture", "export")
    """Stage names of progress events, in order ("refine" only when the preset has refine_steps > 0)."""
    GUIDANCE_STAGE: str | None = None
    """The stage name under which the prior's defaults may tune the guidance scale apart (``PriorDefaults``)."""

    request: TextTo3DRequest

    def setup(self, prior) -> None:
        from engine_server.guidance import Conditioning, ViewPromptConfig, build_guidance, prior_defaults

        request = self.request
        self.preset: Preset = get_preset(request.preset, **request.overrides)
        self.prior = self.use_prior(prior)
        self.defaults = prior_defaults(self.prior)
        self.guidance = build_guidance(self.prior, self.defaults.guidance_config(
            request.guidance, request.guidance_scale, self.GUIDANCE_STAGE, seed=request.seed,
            view_prompts=ViewPromptConfig(perp_neg=request.perp_neg)))
        self.cond = Conditioning(prompt=request.prompt, negative_prompt=request.negative_prompt)
        # Fail on a prompt the prior cannot read now, before any optimisation (and cache its embedding).
        self.guidance.prepare_inputs(self.cond, look_at(orbit_position(0.0, 0.0, 2.5))[None].to(self.device))

        torch.manual_seed(request.seed)
        self.gen = torch.Generator().manual_seed(request.seed)
        self.field = RadianceField(FieldConfig(hashgrid=self.preset.hashgrid,
                                                 blob_density=self.preset.blob_density)).to(self.device)
        self.occupancy = OccupancyGrid(
            OccupancyConfig(resolution=self.preset.occupancy_resolution, threshold=0.01 * self.preset.samples_per_ray),
            aabb=self.field.aabb,
        ).to(self.device)
        self.renderer = VolumeRenderer(RendererConfig(num_steps=self.preset.samples_per_ray, shading="albedo"))
        bg = self.defaults.background_rgb
        # A prior trained on a fixed background must see that background; others get a learned one.
        self.background = (FixedBackground(bg) if bg is not None else MLPBackground()).to(self.device)
        # Matter of that colour renders as no matter: where the prior says so, it is carved away (issue 23).
        self.carve_rgb = bg if bg is not None and self.defaults.background_carve else None
        # Latent priors get small renders, upsampled to their resolution for the encoder (the guidance's resize).
        self.resolution = (self.preset.render_resolution
                           or self.defaults.render_resolution(int(getattr(self.prior, "resolution", 64))))
        self.cameras = CameraSampler(self.defaults.camera_ranges, request.rig, self.gen)
        params = [
            {"params": [self.field.encoder.table], "lr": self.preset.learning_rate},
            {"params": [p for n, p in self.field.named_parameters() if not n.startswith("encoder.")],
             "lr": self.preset.learning_rate * 0.1},
        ]
        bg_params = list(self.background.parameters())
        if bg_params:
            params.append({"params": bg_params, "lr": self.preset.learning_rate * 0.1})
        self.optimizer = Adam(params, betas=(0.9, 0.99), eps=1e-15)
        self.step = 0

    # ---------------------------------------------------------------- the coarse stage's Trainable parts
    checkpoint_key = None
    """Coarse checkpoints are not keyed: the job's checkpoint folder belongs to its request."""

    def checkpoint_state(self) -> dict:
        return {
            "field": self.field.state_dict(),
            "occupancy": self.occupancy.state_dict(),
            "background": self.background.state_dict(),
        }

    def restore_state(self, state: dict) -> None:
        self.field.load_state_dict(state["field"])
        self.occupancy.load_state_dict(state["occupancy"])
        self.background.load_state_dict(state["background"])

    def generators(self) -> dict[str, torch.Generator]:
        return {"cameras": self.gen, "guidance": self.guidance.generator}

    def snapshot(self) -> dict:
        return {"preview": self.preview()}

    def training_step(self) -> tuple[torch.Tensor, dict]:
        self.occupancy.update(self.field.density, self.step)
        return self.coarse_loss()

    # ---------------------------------------------------------------- stages
    def render_views(
        self,
        c2w: torch.Tensor,
        fovs: torch.Tensor,
        jitter: bool,
        shading: str = "albedo",
        light_dirs: torch.Tensor | None = None,
        compute_normals: bool = False,
        resolution: int | None = None,
    ) -> dict:
        """Render B views c2w (B, 4, 4), fovs (B,) at ``resolution`` R (None: the working resolution).

        shading: "albedo" | "lambertian" | "textureless"; light_dirs: (B, 3) unit directions
        towards the light per view (None: headlight). Returns image (B, 3, R, R), rays_d (B*R*R, 3)
        and the renderer's per-ray outputs (opacity (B*R*R,), ..., samples).
        """
        from engine_server.cameras import camera_rays

        res = int(resolution or self.resolution)
        origins, dirs = [], []
        for pose, fov in zip(c2w, fovs):
            o, d = camera_rays(pose.to(self.device), float(fov), res, res)
            origins.append(o.reshape(-1, 3))
            dirs.append(d.reshape(-1, 3))
        rays_d = torch.cat(dirs)
        light = None if light_dirs is None else light_dirs.to(self.device).repeat_interleave(res * res, dim=0)
        out = self.renderer.render(
            self.field, torch.cat(origins), rays_d, self.background,
            shading=shading, light_dir=light, occupancy=self.occupancy, jitter=jitter,
            compute_normals=compute_normals,
        )
        out["image"] = out["rgb"].reshape(len(c2w), res, res, 3).permute(0, 3, 1, 2)
        out["rays_d"] = rays_d
        return out

    def preview(self) -> np.ndarray:
        """A front-three-quarter render (R, R, 3) uint8 of the current field."""
        with torch.no_grad():
            return to_uint8(self.render_views(*self.cameras.preview(), jitter=False)["image"][0])

    def step_resolution(self) -> int:
        """This coarse step's render size: the preset's progressive ramp, else the working resolution."""
        p, full = self.preset, self.resolution
        if p.progressive_start is None or p.progressive_start >= full:
            return full
        t = min(self.step / max(p.progressive_until * p.coarse_steps, 1.0), 1.0)
        return int(round(p.progressive_start + t * (full - p.progressive_start)))

    def _sample_shading(self) -> str:
        """This step's shading (DreamFusion's augmentation): "albedo", "lambertian" or "textureless"."""
        p = self.preset
        if self.step < p.shading_warmup * p.coarse_steps or p.shading_mix[1] + p.shading_mix[2] <= 0:
            return "albedo"
        mix = torch.tensor(p.shading_mix, dtype=torch.float64)
        return ("albedo", "lambertian", "textureless")[int(torch.multinomial(mix, 1, generator=self.gen))]

    def _lights(self, c2w: torch.Tensor) -> tuple[float, list[tuple[float, torch.Tensor]]]:
        """Ambient and (strength, unit direction (B, 3)) lights for lit views c2w (B, 4, 4).

        A prior trained on lit renders (``prior.lighting``) gets exactly its lights, fixed in the
        world, so the field's albedo is the object's colour and shading carries the shape; other
        priors get DreamFusion's random light near the camera.
        """
        lighting = getattr(self.prior, "lighting", None)
        b = len(c2w)
        if lighting:
            lights = [(float(k), torch.nn.functional.normalize(torch.tensor(d, dtype=torch.float32), dim=0).expand(b, 3))
                      for k, d in lighting["lights"]]
            return float(lighting["ambient"]), lights
        eye = c2w[:, :3, 3].float()
        light = eye / eye.norm(dim=-1, keepdim=True) + 0.4 * torch.randn(eye.shape, generator=self.gen)
        return self.renderer.config.ambient, [(1.0 - self.renderer.config.ambient,
                                               torch.nn.functional.normalize(light, dim=-1))]

    def _shade(self, out: dict, c2w: torch.Tensor, shading: str) -> torch.Tensor:
        """Deferred shading of a render made with compute_normals=True -> image (B, 3, R, R).

        Per pixel: albedo (or white, "textureless") times ambient + sum_k s_k max(0, n . l_k),
        with n the pixel's composited normal, over the background.
        """
        b, res = len(c2w), out["image"].shape[-1]
        opacity = out["opacity"][:, None]
        fg = out["rgb"] - (1.0 - opacity) * out["background"]  # (N, 3) = sum_i w_i albedo_i
        if shading == "textureless":
            fg = opacity.expand(-1, 3)
        n = torch.nn.functional.normalize(out["normal"], dim=-1, eps=1e-6)
        ambient, lights = self._lights(c2w)
        shade = torch.full_like(opacity, ambient)
        for strength, direction in lights:
            per_ray = direction.to(n).repeat_interleave(res * res, dim=0)
            shade = shade + strength * (n * per_ray).sum(-1, keepdim=True).clamp_min(0.0)
        rgb = fg * shade.clamp(max=1.0) + (1.0 - opacity) * out["background"]
        return rgb.reshape(b, res, res, 3).permute(0, 3, 1, 2)

    @staticmethod
    def orientation_penalty(out: dict) -> torch.Tensor:
        """DreamFusion's orientation loss: visible samples whose normal faces away from the camera.

        sum_i stop_grad(w_i) * max(0, n_i . d)^2 over samples, per ray with opacity.
        """
        samples = out["samples"]
        if "normals" not in samples or samples["normals"].numel() == 0:
            return out["opacity"].sum() * 0.0
        d = out["rays_d"].index_select(0, samples["ray_indices"])
        facing_away = (samples["normals"] * d).sum(-1).clamp_min(0.0)
        hit_rays = (out["opacity"].detach() > 1e-3).sum().clamp_min(1)
        return (samples["weights"].detach() * facing_away**2).sum() / hit_rays

    def background_matter(self, out: dict) -> torch.Tensor:
        """Mean over rays of the opacity of samples whose albedo is the plain background's colour.

        The albedo is held fixed (detached): only the density goes, so a membrane the prior painted as
        background becomes the hole it shows, rather than a visible film of another colour.
        """
        from engine_server.field import background_likeness

        samples = out["samples"]
        like = background_likeness(samples["albedo"].detach(), self.carve_rgb)
        return (samples["weights"] * like).sum() / max(len(out["opacity"]), 1)

    def coarse_loss(self) -> tuple[torch.Tensor, dict]:
        """One coarse step's loss: samples and renders its own views, scores them with the guidance.

        Returns the scalar loss to back-propagate and a dict of logged values (floats).
        Subclasses replace this to change the objective while reusing the coarse stage's
        occupancy updates and :class:`StepLoop` (optimizer step, checkpoints, events, cancel).
        """
        p = self.preset
        c2w, fovs = self.cameras.sample(p.views_per_step)
        shading = self._sample_shading()
        lit = shading != "albedo"
        # The orientation penalty rides on lit steps, whose normals are computed anyway.
        orient = p.orientation_weight > 0 and lit
        out = self.render_views(c2w, fovs, jitter=True, compute_normals=orient or lit,
                                resolution=self.step_resolution())
        image = self._shade(out, c2w, shading) if lit else out["image"]
        g = self.guidance(image, c2w.to(self.device), self.cond, self.step, p.coarse_steps)
        # Opacity sparsity keeps empty space empty (DreamFusion's opacity penalty).
        opacity = out["opacity"].clamp(1e-5, 1 - 1e-5)
        sparsity = opacity.mean() * self.resolution**2  # per view, counted at the full size
        loss = g.loss + p.sparsity_weight * sparsity * len(c2w)
        logs = {"sds": float(g.loss.detach()), "sparsity": float(sparsity.detach()), "shading": shading}
        if self.carve_rgb is not None and p.background_matter_weight > 0:
            matter = self.background_matter(out) * self.resolution**2  # per view, counted at the full size
            loss = loss + p.background_matter_weight * matter * len(c2w)
            logs["background_matter"] = float(matter.detach())
        if orient:
            orientation = self.orientation_penalty(out)
            loss = loss + p.orientation_weight * orientation
            logs["orientation"] = float(orientation.detach())
        return loss, logs

    def coarse_loop(self) -> StepLoop:
        """The coarse stage's loop (its checkpoint: ``coarse.pt`` in the checkpoint folder)."""
        p = self.preset
        return StepLoop("coarse", p.coarse_steps, p.preview_every, p.checkpoint_every,
                        self.checkpoint_path("coarse.pt"), self.progress, self.cancelled)

    def coarse(self) -> None:
        self.coarse_loop().run(self)

    def surface_density(self, points: torch.Tensor) -> torch.Tensor:
        """The density extraction reads: the field's, less the share of it that is background-coloured matter."""
        if self.carve_rgb is None:
            return self.field.density(points)
        from engine_server.field import background_likeness

        out = self.field(points)
        return out["density"] * (1.0 - background_likeness(out["albedo"], self.carve_rgb))

    @torch.no_grad()
    def extract(self) -> tuple[np.ndarray, np.ndarray]:
        from engine_server.geometry import MIN_PIECE_FRACTION, clean_mesh, marching_tets, tet_grid

        res = self.preset.tet_resolution
        verts, tets = tet_grid(res, device=self.device)
        density = torch.cat([self.surface_density(chunk) for chunk in verts.split(65536)])
        log_density = torch.log1p(density)
        threshold = math.expm1(otsu_threshold(log_density))
        logger.info("surface density threshold %.4g (Otsu on log-density; max %.4g)", threshold, float(density.max()))
        sdf = threshold - close_tunnels(density, threshold, res)  # negative inside, as marching_tets expects
        v, f = marching_tets(verts, tets, sdf)
        if len(f) == 0:
            raise RuntimeError("the field is empty: no surface at the density threshold (try more steps)")
        v, f = clean_mesh(v.cpu().numpy(), f.cpu().numpy(), min_component_fraction=MIN_PIECE_FRACTION)
        self.progress(ProgressEvent("extract", 1, 1, mesh=(v, f)))
        return v, f

    def texture(self, vertices: np.ndarray, faces: np.ndarray):
        """Finish the extraction: smooth, decimate to the preset's faces, unwrap, bake colour + normal map.

        Returns the :class:`~engine_server.export.TexturedMesh` (field frame) and the finishing report.
        """
        from engine_server.field import surface_albedo
        from engine_server.geometry import grid_spacing
        from engine_server.texture.asset import build_asset

        cell = grid_spacing(self.preset.tet_resolution)

        def albedo(points: torch.Tensor) -> torch.Tensor:
            # What the renders showed there, not the fringe's albedo at the extraction level (it leans to the
            # background's colour: issue 23 measured half a white snowman cyan).
            return surface_albedo(self.field, points.to(self.device, torch.float32), outside=2 * cell, inside=4 * cell)

        out = build_asset(vertices, faces, albedo, self.asset_config(self.preset), device=self.device)
        self.progress(ProgressEvent("texture", 1, 1))
        return out

    def refine(self, vertices: np.ndarray, faces: np.ndarray):
        """DMTet + texture-field refinement on the rasterized mesh (presets with refine_steps > 0).

        Returns the finished :class:`~engine_server.export.TexturedMesh` in the frame of the given mesh
        and the finishing report.
        """
        from engine_server.pipelines.refine import MeshRefiner, RefineConfig

        lo, hi = vertices.min(0), vertices.max(0)
        centre, scale = 0.5 * (lo + hi), float((hi - lo).max())
        # The refiner works in the mesh's unit box; it starts its texture from the coarse field's albedo.
        start = _FieldAlbedo(self.field, centre, scale)
        refiner = MeshRefiner(self.prior, self.cond, RefineConfig.from_preset(self.preset, "full"), self.device,
                              self.progress, self.cancelled, seed=self.request.seed,
                              checkpoint_dir=self.checkpoint_dir, texture_field=start)
        out = refiner.run((vertices - centre) / scale, faces)
        return dataclasses.replace(out.mesh, vertices=out.mesh.vertices * scale + centre), out.asset

    def sidecar(self) -> dict:
        """What the sidecar records about this job (the export adds device and timings)."""
        return {
            "prompt": self.request.prompt,
            "negative_prompt": self.request.negative_prompt,
            "seed": self.request.seed,
            "preset": asdict(self.preset) | {"hashgrid": asdict(self.preset.hashgrid)},
            "model": self.request.model,
            "guidance": self.request.guidance,
            "guidance_scale": self.guidance.config.guidance_scale,
            "perp_neg": self.request.perp_neg,
        }

    def run(self, out_path: str | Path) -> PipelineResult:
        from engine_server.export import object_name

        t0 = time.perf_counter()
        with self.timed("coarse"):
            self.coarse()
        with self.timed("extract"):
            vertices, faces = self.extract()
        if self.preset.refine_steps > 0:
            with self.timed("refine"):
                mesh, asset = self.refine(vertices, faces)
        else:
            with self.timed("texture"):
                mesh, asset = self.texture(vertices, faces)
        # Normalise to a unit bounding box centred at the origin (DESIGN.md coordinates).
        v = mesh.vertices.astype(np.float32)
        lo, hi = v.min(0), v.max(0)
        mesh = dataclasses.replace(mesh, vertices=(v - 0.5 * (lo + hi)) / float((hi - lo).max()))
        return self.export(Path(out_path), t0, mesh, self.sidecar() | {"asset": asset},
                           name=object_name(self.request.prompt))


class _FieldAlbedo(torch.nn.Module):
    """The coarse field's albedo at points of the extracted mesh's unit box (field = unit * scale + centre)."""

    def __init__(self, field: RadianceField, centre: np.ndarray, scale: float) -> None:
        super().__init__()
        self.field = field
        self.register_buffer("centre", torch.as_tensor(centre, dtype=torch.float32))
        self.scale = scale

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.field(points * self.scale + self.centre)["albedo"]
