"""Mesh refinement by score distillation on a rasterized mesh (Magic3D / Fantasia3D style).

Two users:

- the ``refine`` stage of text-to-3D (standard / high presets): DMTet refinement of the
  extracted mesh's geometry plus a texture field, through :class:`MeshRefiner`;
- the ``refine`` job kind (:class:`RefineMesh`): an artist's mesh (+ optional UVs and
  ``matrix_world``) and a prompt in, a refined GLB out, in two modes:

  ``full``     geometry and texture: a DMTet initialised from the mesh's signed distance
               and a hash-grid texture field are optimised together; the result is a new
               mesh (new topology), unwrapped with xatlas and baked from the field;
  ``texture``  geometry frozen: only the texture field is optimised, then baked onto the
               ORIGINAL topology, reusing its UVs where they are usable (same faces, same
               vertex positions; vertices are only duplicated along UV seams).

Each step renders ``views_per_step`` random views (the prior's camera ranges, see
:class:`~engine_server.cameras.CameraSampler`) with the portable
differentiable rasterizer (``kernels.rasterize``): per-pixel surface points are looked up
in the texture field, shaded with the prior's own lights (``prior.lighting``: for the
bundled prior its training lights, ambient + key + fill Lambertian), composited over the prior's background and
antialiased (silhouette gradients reach the DMTet). The guidance's surrogate loss plus
weighted DMTet regularisers is minimised with Adam.

Frames: :meth:`MeshRefiner.run` normalises the input into the unit box (largest side 1,
centred at the origin) for the optimisation and maps the result back, so a refined
mesh sits where the input was. :class:`RefineMesh` additionally applies the request's
``world_matrix`` first (the prior must see the object upright in the world) and returns
vertices in the input's local frame.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine_server.cameras import CameraSampler, look_at, orbit_position
from engine_server.export import MaterialParams, TexturedMesh
from engine_server.guidance.config import TimestepSchedule
from engine_server.pipelines.base import JobPipeline, PipelineResult, never_cancelled, no_progress, to_uint8
from engine_server.pipelines.events import Cancelled, ProgressCallback, ProgressEvent
from engine_server.pipelines.loop import StepLoop
from engine_server.pipelines.optim import Adam
from engine_server.pipelines.presets import DEFAULT_PRESET, Preset, get_preset
from kernels.hashgrid import HashGridConfig, HashGridEncoder

logger = logging.getLogger(__name__)

MODES = ("full", "texture")
"""Refine modes: geometry + texture, or texture only on the frozen input geometry."""

DRAFT_REFINE_STEPS = 150
"""Steps used when the preset has no refine stage of its own (draft's ``refine_steps`` is 0)."""


# ------------------------------------------------------------------------------------ config
@dataclass
class RegularizerWeights:
    """Weights of the DMTet regularisers (``DMTet.regularizers``) in full mode."""

    sdf_sign_flip: float = 1.0
    """BCE across sign-changing grid edges: no floaters or spurious sheets."""
    deformation: float = 0.01
    """Mean squared vertex offset in grid spacings: keeps the grid regular."""
    laplacian: float = 1e4
    """Uniform-Laplacian smoothness of the extracted surface (units: squared world length)."""
    normal_consistency: float = 1e3
    """1 - cos between neighbouring face normals."""


@dataclass
class RefineConfig:
    """Everything one refinement run uses; :meth:`from_preset` fills it from a named preset.

    Knobs a :class:`Preset` also has carry the preset's field name (``refine_steps``,
    ``render_resolution``, ...), so one name overrides them everywhere.
    """

    mode: str = "full"
    """"full" (DMTet geometry + texture field) or "texture" (geometry frozen)."""
    refine_steps: int = DRAFT_REFINE_STEPS
    """Score-distillation steps."""
    views_per_step: int = 4
    """Views rendered and scored per step."""
    render_resolution: int | None = None
    """Render size in pixels; None: the prior's native resolution."""
    tet_resolution: int = 48
    """Cubes per axis of the DMTet lattice (full mode)."""
    grid_scale: float = 0.6
    """DMTet lattice / texture-field half-size; the mesh is normalised to [-0.5, 0.5]^3 inside it."""
    texture_hashgrid: HashGridConfig = field(default_factory=lambda: HashGridConfig(
        n_levels=8, n_features=2, log2_table_size=15, base_resolution=8, max_resolution=256))
    """Hash-grid encoding of the texture field."""
    texture_hidden: int = 32
    """Width of the texture MLP's hidden layer."""
    texture_lr: float = 1e-2
    """Adam learning rate of the texture hash table (its MLP uses a tenth)."""
    sdf_lr: float = 1e-2
    """Adam learning rate of the DMTet SDF values (world units per step, roughly)."""
    deformation_lr: float = 3e-2
    """Adam learning rate of the DMTet raw (tanh-bounded) vertex offsets."""
    regularizers: RegularizerWeights = field(default_factory=RegularizerWeights)
    """DMTet regulariser weights (full mode)."""
    guidance: str = "sds"
    """Distillation mode: "sds" or "vsd"."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale; None: the prior's recommended scale for refining in that mode
    (``PriorDefaults.scale(mode, "refine")``: 100 for SDS with Stable Diffusion, 3 for the bundled prior)."""
    timesteps: TimestepSchedule = field(default_factory=lambda: TimestepSchedule(start=(0.5, 0.8), end=(0.2, 0.5)))
    """Annealed SDS timestep range (the mesh is already roughly right: less noise than a coarse stage)."""
    texture_size: int = 512
    """Baked texture size in pixels."""
    faces: int = 20000
    """Most triangles of the result in full mode (quadric decimation); texture mode keeps the input's."""
    preview_every: int = 50
    """Steps between preview images / intermediate meshes in progress events."""
    checkpoint_every: int = 100
    """Steps between checkpoints (with a checkpoint folder)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"refine mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for key in ("refine_steps", "views_per_step", "tet_resolution", "texture_hidden", "preview_every",
                    "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"refine option {key} must be >= 1, got {getattr(self, key)}")
        if self.render_resolution is not None and not 8 <= self.render_resolution <= 2048:
            raise ValueError(f"refine render_resolution must be in [8, 2048] or None, got {self.render_resolution}")
        if not 16 <= self.texture_size <= 8192:
            raise ValueError(f"texture_size must be in [16, 8192], got {self.texture_size}")
        if not 100 <= self.faces <= 2_000_000:
            raise ValueError(f"faces (the face-count target) must be in [100, 2000000], got {self.faces}")
        if self.grid_scale <= 0.5:
            raise ValueError(f"grid_scale must exceed 0.5 (the unit box's half-size), got {self.grid_scale}")
        for key in ("texture_lr", "sdf_lr", "deformation_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"refine option {key} must be > 0, got {getattr(self, key)}")

    @classmethod
    def from_preset(cls, preset: str | Preset = DEFAULT_PRESET, mode: str = "full", **overrides) -> RefineConfig:
        """A config from a preset's refine values, then ``overrides``.

        Override keys are the preset's field names (``refine_steps``, ``texture_size``,
        ``tet_resolution``, ...; validated by the preset) or knobs only :class:`RefineConfig`
        has (``sdf_lr``, ``grid_scale``, ...); anything else is a ``ValueError``.
        """
        mine = {f.name for f in dataclasses.fields(cls)}
        preset_keys = {f.name for f in dataclasses.fields(Preset)} - {"name"}
        unknown = sorted(set(overrides) - mine - preset_keys)
        if unknown:
            raise ValueError(f"unknown refine option(s) {', '.join(unknown)}; known: {', '.join(sorted(mine | preset_keys))}")
        preset_over = {k: v for k, v in overrides.items() if k in preset_keys}
        if isinstance(preset, Preset):
            p = preset.override(**preset_over) if preset_over else preset
        else:
            p = get_preset(preset, **preset_over)
        base = cls(
            mode=mode,
            refine_steps=p.refine_steps or DRAFT_REFINE_STEPS,
            views_per_step=p.views_per_step,
            render_resolution=p.render_resolution,
            tet_resolution=p.tet_resolution,
            texture_size=p.texture_size,
            faces=p.faces,
            preview_every=p.preview_every,
            checkpoint_every=p.checkpoint_every,
        )
        mine_over = {k: v for k, v in overrides.items() if k in mine - preset_keys and v is not None}
        return dataclasses.replace(base, **mine_over) if mine_over else base


# ------------------------------------------------------------------------------------ pieces
class TextureField(nn.Module):
    """Albedo at surface points: hash-grid encoding + a small MLP, sigmoid output.

    forward(x (N, 3) world points in the box [-half, half]^3) -> (N, 3) RGB in [0, 1].
    Starts near mid grey.
    """

    def __init__(self, hashgrid: HashGridConfig, hidden: int = 32, half_size: float = 0.6,
                 backend: str = "auto") -> None:
        super().__init__()
        from engine_server.field.network import mlp

        self.half_size = float(half_size)
        self.encoder = HashGridEncoder(hashgrid, backend=backend)
        self.net = mlp(self.encoder.output_dim, hidden, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = ((x.float() / self.half_size) * 0.5 + 0.5).clamp(0.0, 1.0)
        return torch.sigmoid(self.net(self.encoder(u)))


def check_input_mesh(vertices, faces, uvs=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated copies: vertices (V, 3) float64, faces (F, 3) int64, uvs (V, 2) / (F, 3, 2) float32 or None.

    Raises ValueError naming the problem: no vertices or faces, wrong shapes, NaN /
    infinite coordinates, face indices out of range, a flat (zero-size) mesh.
    """
    v = vertices.detach().cpu().numpy() if isinstance(vertices, torch.Tensor) else np.asarray(vertices)
    f = faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"mesh vertices must be a non-empty (V, 3) array, got shape {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"mesh faces must be a non-empty (F, 3) array of vertex indices, got shape {f.shape}")
    if not np.issubdtype(v.dtype, np.number) or not np.isfinite(v.astype(np.float64)).all():
        bad = int((~np.isfinite(v.astype(np.float64))).any(1).sum()) if np.issubdtype(v.dtype, np.number) else len(v)
        raise ValueError(f"mesh vertices must be finite numbers: {bad} of {len(v)} vertices are NaN or infinite")
    if not np.issubdtype(f.dtype, np.integer):
        if np.issubdtype(f.dtype, np.floating) and np.isfinite(f).all() and (f == np.round(f)).all():
            f = f.astype(np.int64)
        else:
            raise ValueError(f"mesh faces must be integer vertex indices, got dtype {f.dtype}")
    f = f.astype(np.int64)
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"mesh face indices must be in [0, {len(v)}), got range [{int(f.min())}, {int(f.max())}]")
    used = v[np.unique(f)].astype(np.float64)
    size = float((used.max(0) - used.min(0)).max())
    if size <= 0:
        raise ValueError("the mesh has zero size (all its vertices coincide)")
    uv = None
    if uvs is not None:
        uv = uvs.detach().cpu().numpy() if isinstance(uvs, torch.Tensor) else np.asarray(uvs)
        uv = uv.astype(np.float32)
        if uv.shape not in ((len(v), 2), (len(f), 3, 2)):
            raise ValueError(f"mesh uvs must be (V, 2) = ({len(v)}, 2) or (F, 3, 2) = ({len(f)}, 3, 2), got {uv.shape}")
    return v.astype(np.float64), f, uv


@dataclass
class RefineOutput:
    """What :meth:`MeshRefiner.run` returns, in the frame of the mesh it was given."""

    mesh: TexturedMesh
    """The result to export: full mode smoothed, decimated to ``faces``, with a normal map; texture mode the
    input's geometry (split along UV seams) with its base colour. ``vertices`` ... ``texture`` are its arrays."""
    asset: dict
    """:func:`~engine_server.texture.asset.build_asset`'s report (full mode), or the texture size (texture mode)."""

    vertices: np.ndarray
    """(V', 3) float32 positions (texture mode: the input's, duplicated along UV seams)."""
    faces: np.ndarray
    """(F', 3) int64 (texture mode: the input's faces, same order, indexing ``vertices``)."""
    uvs: np.ndarray
    """(V', 2) float32 glTF UVs (top-left origin)."""
    texture: np.ndarray
    """(S, S, 3) uint8 base colour."""
    vmapping: np.ndarray | None
    """(V',) int64 input vertex of each output vertex (texture mode), None in full mode."""
    losses: list[float]
    """Total loss of every step run in this call."""


# ------------------------------------------------------------------------------------ refiner
class MeshRefiner:
    """Score-distillation refinement of a triangle mesh (see the module docstring).

    ``cond``: what the mesh should look like. ``texture_field``: an optional module
    mapping unit-box points (N, 3) to albedo (N, 3) in [0, 1] to start from (e.g. the
    coarse field's albedo); a fresh :class:`TextureField` otherwise. The optimisation is a
    :class:`~engine_server.pipelines.loop.Trainable` run by :class:`StepLoop` (stage "refine").
    """

    def __init__(
        self,
        prior,
        cond,
        config: RefineConfig | None = None,
        device: str | torch.device = "cpu",
        progress: ProgressCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
        seed: int = 0,
        checkpoint_dir: str | Path | None = None,
        texture_field: nn.Module | None = None,
    ) -> None:
        from engine_server.guidance import build_guidance, prior_defaults

        self.config = config or RefineConfig()
        self.device = torch.device(device)
        self.prior = prior
        self.cond = cond
        self.progress = progress or no_progress
        self.cancelled = cancelled or never_cancelled
        self.seed = int(seed)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.defaults = prior_defaults(prior)
        self.guidance = build_guidance(prior, self.defaults.guidance_config(
            self.config.guidance, self.config.guidance_scale, "refine", seed=self.seed,
            timesteps=self.config.timesteps))
        # Fail on a prompt the prior cannot read now, before any work.
        self.guidance.prepare_inputs(cond, look_at(orbit_position(0.0, 0.0, 2.5))[None].to(self.device))
        bg = self.defaults.background_rgb
        self.background = torch.tensor(bg if bg is not None else (1.0, 1.0, 1.0), dtype=torch.float32,
                                       device=self.device)
        self.resolution = int(self.config.render_resolution
                              or self.defaults.render_resolution(int(getattr(prior, "resolution", 64))))
        self.gen = torch.Generator().manual_seed(self.seed)
        self.cameras = CameraSampler(self.defaults.camera_ranges, None, self.gen)
        # The prior's own world-fixed lights; priors that declare none get the bundled model's studio lights.
        lighting = getattr(prior, "lighting", None)
        if not lighting:
            from engine_server.models.bundled.procedural import studio_lighting

            lighting = studio_lighting()
        self.ambient = float(lighting["ambient"])
        self.lights = [(float(k), F.normalize(torch.tensor(d, dtype=torch.float32), dim=0)) for k, d in lighting["lights"]]
        self._initial_texture_field = texture_field
        self.step = 0
        self.dmtet = None
        self.texture_field: nn.Module | None = None
        self.optimizer: Adam | None = None
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.checkpoint_key: str | None = None
        """Set by ``_setup``: refine checkpoints resume only the same input, config, seed and prompt."""

    # ---------------------------------------------------------------- rendering
    def shade(self, normals: torch.Tensor) -> torch.Tensor:
        """Lambertian shading factor (...,) of unit world normals (..., 3), at most 1."""
        s = torch.full_like(normals[..., 0], self.ambient)
        for strength, direction in self.lights:
            s = s + strength * (normals @ direction.to(normals)).clamp(min=0.0)
        return s.clamp(max=1.0)

    def render(self, vertices: torch.Tensor, faces: torch.Tensor, c2w: torch.Tensor, fovs: torch.Tensor,
               resolution: int | None = None, antialias: bool = True) -> dict[str, torch.Tensor]:
        """Shaded renders of a mesh coloured by the texture field.

        vertices (V, 3) unit-box coordinates, faces (F, 3), c2w (B, 4, 4), fovs (B,) degrees.
        Returns image (B, 3, R, R) composited over the background, mask (B, 1, R, R).
        """
        from kernels.rasterize import antialias as antialias_op
        from kernels.rasterize import face_normals, interpolate, perspective_projection, rasterize, transform_vertices
        from kernels.rasterize.render import face_attribute

        res = int(resolution or self.resolution)
        c2w = c2w.to(self.device, torch.float32)
        mvp = torch.stack([perspective_projection(c2w[i], float(fovs[i]), 1.0) for i in range(len(c2w))])
        clip = transform_vertices(vertices, mvp)  # (B, V, 4)
        rast = rasterize(clip, faces, (res, res))
        mask = rast[..., 3:] > 0  # (B, R, R, 1)
        points = interpolate(vertices, rast, faces)  # (B, R, R, 3)
        normals = face_attribute(face_normals(vertices, faces), rast)
        pix = mask[..., 0].reshape(-1).nonzero().squeeze(1)
        color = torch.zeros(points.numel() // 3, 3, device=self.device)
        if pix.numel():
            flat_points = points.reshape(-1, 3)[pix]
            flat_normals = normals.reshape(-1, 3)[pix]
            albedo = self.texture_field(flat_points)
            color = color.index_put((pix,), albedo * self.shade(flat_normals)[:, None])
        color = color.view(*points.shape)
        m = mask.to(color.dtype)
        rgb = color * m + self.background * (1.0 - m)
        if antialias:
            aa = antialias_op(torch.cat([rgb, m], dim=-1), rast, clip, faces)
            rgb, m = aa[..., :3], aa[..., 3:]
        return {"image": rgb.permute(0, 3, 1, 2).contiguous(), "mask": m.permute(0, 3, 1, 2)}

    def current_mesh(self) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
        """The mesh being optimised (unit box): vertices (V, 3), faces (F, 3), the DMTet output (full mode)."""
        if self.dmtet is not None:
            out = self.dmtet()
            return out["vertices"], out["faces"], out
        assert self._fixed is not None
        return self._fixed[0], self._fixed[1], None

    @torch.no_grad()
    def preview(self) -> np.ndarray:
        """A front-three-quarter render (R, R, 3) uint8 of the current mesh and texture."""
        v, f, _ = self.current_mesh()
        if f.shape[0] == 0:
            return np.zeros((self.resolution, self.resolution, 3), np.uint8)
        return to_uint8(self.render(v, f, *self.cameras.preview(), antialias=False)["image"][0])

    # ---------------------------------------------------------------- setup
    def _setup(self, v_unit: np.ndarray, faces: np.ndarray) -> None:
        from engine_server.geometry import DMTet, DMTetConfig

        cfg = self.config
        torch.manual_seed(self.seed)
        if self._initial_texture_field is not None:
            self.texture_field = self._initial_texture_field.to(self.device)
        else:
            self.texture_field = TextureField(cfg.texture_hashgrid, cfg.texture_hidden, cfg.grid_scale).to(self.device)
        table = [p for n, p in self.texture_field.named_parameters() if n.startswith("encoder.")]
        rest = [p for n, p in self.texture_field.named_parameters() if not n.startswith("encoder.")]
        groups = [{"params": table, "lr": cfg.texture_lr}, {"params": rest, "lr": cfg.texture_lr * 0.1}]
        groups = [g for g in groups if g["params"]]
        if cfg.mode == "full":
            self.dmtet = DMTet.from_mesh(v_unit, faces, DMTetConfig(resolution=cfg.tet_resolution,
                                                                     grid_scale=cfg.grid_scale)).to(self.device)
            groups += [{"params": [self.dmtet.sdf], "lr": cfg.sdf_lr},
                       {"params": [self.dmtet.deformation_raw], "lr": cfg.deformation_lr}]
        else:
            self.dmtet = None
            self._fixed = (torch.as_tensor(v_unit, dtype=torch.float32, device=self.device),
                           torch.as_tensor(faces, dtype=torch.long, device=self.device))
        self.optimizer = Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(v_unit, np.float64).tobytes())
        h.update(np.ascontiguousarray(faces, np.int64).tobytes())
        h.update(repr(asdict(cfg)).encode())
        h.update(f"{self.seed}|{getattr(self.cond, 'prompt', '')}".encode())
        self.checkpoint_key = h.hexdigest()
        self.step = 0

    # ---------------------------------------------------------------- the Trainable parts
    def checkpoint_state(self) -> dict:
        return {"texture_field": self.texture_field.state_dict(),
                "dmtet": self.dmtet.state_dict() if self.dmtet is not None else None}

    def restore_state(self, state: dict) -> None:
        self.texture_field.load_state_dict(state["texture_field"])
        if self.dmtet is not None:
            self.dmtet.load_state_dict(state["dmtet"])

    def generators(self) -> dict[str, torch.Generator]:
        return {"cameras": self.gen, "guidance": self.guidance.generator}

    @torch.no_grad()
    def snapshot(self) -> dict:
        """The preview, and in full mode the intermediate mesh in the input's frame."""
        shown: dict = {"preview": self.preview()}
        if self.dmtet is not None:
            v, f = self.dmtet.extract_mesh(clean=False)
            shown["mesh"] = (self._to_input_frame(v).astype(np.float32), f)
        return shown

    # ---------------------------------------------------------------- optimisation
    def training_step(self) -> tuple[torch.Tensor, dict[str, float]]:
        """One step's loss: render random views of the current mesh, score them, add regularisers."""
        cfg = self.config
        v, f, out = self.current_mesh()
        if f.shape[0] == 0:
            raise RuntimeError(f"the refined surface vanished at step {self.step} (no faces left); "
                               "try fewer steps or a lower sdf_lr")
        c2w, fovs = self.cameras.sample(cfg.views_per_step)
        images = self.render(v, f, c2w, fovs, antialias=out is not None)["image"]
        g = self.guidance(images, c2w.to(self.device), self.cond, self.step, cfg.refine_steps)
        loss = g.loss
        logs = {"sds": float(g.loss.detach())}
        if out is not None:
            regs = self.dmtet.regularizers(out)
            for name, value in regs.items():
                weight = getattr(cfg.regularizers, name)
                if weight:
                    loss = loss + weight * value
                    logs[name] = float(value.detach())
        return loss, logs

    def optimise(self) -> list[float]:
        """Run the remaining steps (resuming from a checkpoint when one matches); returns their losses."""
        cfg = self.config
        checkpoint = self.checkpoint_dir / "refine.pt" if self.checkpoint_dir else None
        return StepLoop("refine", cfg.refine_steps, cfg.preview_every, cfg.checkpoint_every, checkpoint,
                        self.progress, self.cancelled).run(self)

    def _to_input_frame(self, points: np.ndarray) -> np.ndarray:
        return self._transform.invert(points)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """The texture field's colour (N, 3) at unit-box points (N, 3) (for baking)."""
        return self.texture_field(points.to(self.device, torch.float32))

    def run(self, vertices, faces, uvs=None) -> RefineOutput:
        """Refine a mesh: vertices (V, 3), faces (F, 3), optional uvs (V, 2) or (F, 3, 2) (glTF convention).

        The result is in the same frame as the input (see :class:`RefineOutput`).
        """
        from engine_server.geometry import normalize_mesh
        from engine_server.texture import BakeConfig, UnwrapConfig, bake_onto_uvs
        from engine_server.texture.asset import ROUGHNESS, AssetConfig, build_asset

        v_in, f_in, uv_in = check_input_mesh(vertices, faces, uvs)
        used = np.unique(f_in)
        _, self._transform = normalize_mesh(v_in[used])
        v_unit = self._transform.apply(v_in)
        self._setup(v_unit, f_in)
        losses = self.optimise()
        if self.cancelled():
            raise Cancelled()

        cfg = self.config
        if cfg.mode == "texture":
            uv_mesh, texture = bake_onto_uvs(v_unit.astype(np.float32), f_in, uv_in, self.albedo,
                                             BakeConfig(size=cfg.texture_size), device=self.device,
                                             unwrap_config=UnwrapConfig(texture_size=cfg.texture_size))
            out_v = v_in[uv_mesh.vmapping].astype(np.float32)  # exactly the input positions
            mesh = TexturedMesh(out_v, uv_mesh.faces, uv_mesh.uvs, texture, material=MaterialParams(roughness=ROUGHNESS))
            self.progress(ProgressEvent("texture", 1, 1))
            return RefineOutput(mesh, {"texture_size": cfg.texture_size}, out_v, uv_mesh.faces, uv_mesh.uvs, texture,
                                uv_mesh.vmapping, losses)

        from engine_server.geometry import MIN_PIECE_FRACTION, clean_mesh

        v_new, f_new = clean_mesh(*self.dmtet.extract_mesh(clean=False), min_component_fraction=MIN_PIECE_FRACTION)
        if len(f_new) == 0:
            raise RuntimeError("refinement left no surface")
        mesh, report = build_asset(v_new, f_new, self.albedo, AssetConfig(faces=cfg.faces, texture_size=cfg.texture_size),
                                   device=self.device)
        # The unit box is a uniform scale and shift of the input's frame: normals carry over as they are.
        mesh = dataclasses.replace(mesh, vertices=self._to_input_frame(mesh.vertices).astype(np.float32))
        self.progress(ProgressEvent("texture", 1, 1))
        return RefineOutput(mesh, report, mesh.vertices, mesh.faces, mesh.uvs, mesh.base_color, None, losses)


# ------------------------------------------------------------------------------------ job
@dataclass
class RefineMeshRequest:
    """One refine job: a mesh and a prompt."""

    prompt: str
    """What the mesh should become / look like."""
    vertices: np.ndarray
    """(V, 3) positions in the object's local frame."""
    faces: np.ndarray
    """(F, 3) vertex indices."""
    uvs: np.ndarray | None = None
    """(V, 2) or (F, 3, 2) glTF UVs to reuse in texture mode, or None."""
    world_matrix: np.ndarray | None = None
    """(4, 4) object-to-world (Blender matrix_world); None: identity."""
    mode: str = "full"
    """"full" (geometry + texture) or "texture" (texture only, original topology kept)."""
    negative_prompt: str = ""
    """What to avoid (ignored by the bundled prior)."""
    seed: int = 0
    """Seed of every random choice."""
    preset: str = DEFAULT_PRESET
    """Preset name (draft | standard | high)."""
    model: str = "bundled"
    """Prior: "bundled", a local diffusers folder or a hub id."""
    guidance: str = "sds"
    """Distillation mode: "sds" or "vsd"."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale; None: the prior's recommended scale for refining in that mode."""
    overrides: dict = field(default_factory=dict)
    """Preset values (``refine_steps``, ``texture_size``, ...) or RefineConfig-only knobs (``sdf_lr``, ...)
    to override, e.g. {"refine_steps": 100}."""


def _check_world_matrix(m) -> np.ndarray:
    m = np.eye(4) if m is None else np.asarray(m, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise ValueError(f"world_matrix must be a finite (4, 4) matrix, got shape {m.shape}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12 or not np.allclose(m[3], (0, 0, 0, 1)):
        raise ValueError("world_matrix must be an invertible affine transform (last row 0 0 0 1)")
    return m


class RefineMesh(JobPipeline):
    """The ``refine`` job: ``run(out_path)`` refines the request's mesh and writes the GLB + sidecar."""

    STAGES = ("refine", "texture", "export")

    request: RefineMeshRequest

    def setup(self, prior) -> None:
        from engine_server.guidance import Conditioning

        request = self.request
        # Validate everything before loading anything heavy.
        self.vertices, self.faces, self.uvs = check_input_mesh(request.vertices, request.faces, request.uvs)
        self.world_matrix = _check_world_matrix(request.world_matrix)
        self.config = RefineConfig.from_preset(request.preset, request.mode, **request.overrides)
        self.config = dataclasses.replace(self.config, guidance=request.guidance, guidance_scale=(
            self.config.guidance_scale if request.guidance_scale is None else request.guidance_scale))
        self.prior = self.use_prior(prior)
        self.cond = Conditioning(prompt=request.prompt, negative_prompt=request.negative_prompt)
        self.refiner = MeshRefiner(self.prior, self.cond, self.config, self.device, self.progress, self.cancelled,
                                   seed=request.seed, checkpoint_dir=self.checkpoint_dir)

    def run(self, out_path: str | Path) -> PipelineResult:
        from engine_server.export import object_name

        t0 = time.perf_counter()
        m = self.world_matrix
        with self.timed("refine"):
            out = self.refiner.run(self.vertices @ m[:3, :3].T + m[:3, 3], self.faces, self.uvs)
        mesh = out.mesh
        if out.vmapping is not None:
            mesh = dataclasses.replace(mesh, vertices=self.vertices[out.vmapping].astype(np.float32))  # bit-exact input
        else:
            inv = np.linalg.inv(m[:3, :3])
            local = ((mesh.vertices.astype(np.float64) - m[:3, 3]) @ inv.T).astype(np.float32)
            # Normals go back with the inverse transpose of world -> local, i.e. n @ M (rows), renormalised.
            normals = mesh.normals.astype(np.float64) @ m[:3, :3]
            normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
            mesh = dataclasses.replace(mesh, vertices=local, normals=normals.astype(np.float32))
        if not np.isfinite(mesh.vertices).all():
            raise FloatingPointError("the refined mesh has non-finite vertices")
        sidecar = {
            "kind": "refine",
            "prompt": self.request.prompt,
            "negative_prompt": self.request.negative_prompt,
            "seed": self.request.seed,
            "preset": self.request.preset,
            "mode": self.config.mode,
            "refine": asdict(self.config),
            "model": self.request.model,
            "guidance": self.config.guidance,
            "guidance_scale": self.refiner.guidance.config.guidance_scale,
            "input": {"vertices": int(len(self.vertices)), "faces": int(len(self.faces)),
                      "uvs_given": self.uvs is not None},
            "world_matrix": m.tolist(),
            "final_loss": out.losses[-1] if out.losses else None,
            "asset": out.asset,
        }
        return self.export(Path(out_path), t0, mesh, sidecar, name=object_name(self.request.prompt, prefix="refined_"),
                           vmapping=out.vmapping)
