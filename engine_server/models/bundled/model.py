"""The bundled prior's network: a UNet (diffusers' ``UNet2DModel`` layout, :mod:`.unet`) with prompt, camera
and image conditions.

Conditions enter in two places:

- a vector added to the timestep embedding (``class_embed_type="identity"``):
  learned shape-word + colour-word embeddings, an MVDream-style embedding of the
  target camera (its c2w rotation, position and FOV through a small MLP), and in
  image-conditioned mode a Zero123-style embedding of the reference camera and
  the relative pose (delta azimuth / elevation / distance);
- extra input channels: the reference view (scaled to [-1, 1]) and a flag
  channel that is 1 where a reference is given, 0 (with a zero image) otherwise.

Every condition can be absent (null embedding / zeros), which is what
classifier-free guidance uses as the unconditional branch.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine_server.models.bundled.procedural import DEFAULT_DISTANCE, DEFAULT_FOV
from engine_server.models.bundled.unet import BundledUNet2D, TimestepEmbedding
from engine_server.models.bundled.vocab import COLOR_NAMES, SHAPES

logger = logging.getLogger(__name__)

CAMERA_FEATURES = 13
REF_FEATURES = CAMERA_FEATURES + 4
POSE_HARMONICS = 4
"""Azimuth harmonics (sin / cos of k az, k = 1..4) of the shape-camera embedding: a cube repeats every 90 degrees."""
POSE_FEATURES = 2 * POSE_HARMONICS + 2


@dataclass
class BundledModelConfig:
    """Architecture of the bundled prior (saved as config.json beside the weights)."""

    resolution: int = 32
    """Image side in pixels."""
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    """UNet channels per resolution level."""
    layers_per_block: int = 1
    """ResNet blocks per level."""
    attention_levels: tuple[bool, ...] = (False, False, True)
    """Self-attention at each level (lowest resolution last)."""
    norm_num_groups: int = 16
    """GroupNorm groups."""
    shapes: tuple[str, ...] = SHAPES
    """Shape words, in embedding order."""
    colors: tuple[str, ...] = COLOR_NAMES
    """Colour words, in embedding order."""
    prediction_type: str = "v_prediction"
    """What the network predicts (diffusers name)."""
    num_train_timesteps: int = 1000
    """Diffusion steps in training."""
    beta_schedule: str = "squaredcos_cap_v2"
    """Noise schedule (rescaled to zero terminal SNR)."""
    shape_camera: bool = False
    """A shape-camera embedding besides the summed shape and camera ones: the outer product of the shape word
    (one-hot) and the camera's azimuth harmonics and elevation through an MLP, so a shape word can say how the
    object turns with the camera (issue 23: summed alone, the cube and the table were drawn the same from every
    azimuth). Its output layer starts at zero, so it can be added to trained weights and fine-tuned."""
    extra: dict = field(default_factory=dict)
    """Free-form metadata (background colour, camera ranges, training info)."""

    @property
    def embed_dim(self) -> int:
        """Timestep / condition embedding width."""
        return self.block_out_channels[0] * 4

    def to_json(self) -> dict:
        """JSON-safe dict."""
        d = asdict(self)
        for k in ("block_out_channels", "attention_levels", "shapes", "colors"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "BundledModelConfig":
        """Inverse of to_json; unknown keys are an error."""
        known = {f for f in cls.__dataclass_fields__}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown keys in bundled model config: {sorted(bad)}")
        d = dict(d)
        for k in ("block_out_channels", "attention_levels", "shapes", "colors"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def camera_features(c2w: torch.Tensor, fov: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 4, 4) c2w (+ (B,) FOV degrees) -> (B, 13) normalised features: rotation, position, FOV."""
    b = c2w.shape[0]
    if fov is None:
        fov = torch.full((b,), DEFAULT_FOV, device=c2w.device, dtype=c2w.dtype)
    rot = c2w[:, :3, :3].reshape(b, 9)
    pos = c2w[:, :3, 3] / DEFAULT_DISTANCE
    return torch.cat([rot, pos, ((fov - DEFAULT_FOV) / 4.0)[:, None]], dim=1).float()


def _orbit_angles(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Camera positions (B, 3) -> azimuth, elevation (radians) and distance, each (B,)."""
    r = p.norm(dim=-1)
    az = torch.atan2(p[:, 0], -p[:, 1])
    el = torch.asin((p[:, 2] / r.clamp_min(1e-6)).clamp(-1, 1))
    return az, el, r


def relative_features(c2w: torch.Tensor, ref_c2w: torch.Tensor) -> torch.Tensor:
    """Zero123-style relative pose of target vs reference: (B, 4) [sin daz, cos daz, d_el, d_dist]."""
    az, el, r = _orbit_angles(c2w[:, :3, 3])
    raz, rel, rr = _orbit_angles(ref_c2w[:, :3, 3])
    daz = az - raz
    return torch.stack([torch.sin(daz), torch.cos(daz), (el - rel) / (math.pi / 3), (r - rr) / 0.3], dim=1).float()


def pose_features(cam_feat: torch.Tensor) -> torch.Tensor:
    """(B, 13) camera features -> (B, POSE_FEATURES): sin / cos of k az (k = 1..POSE_HARMONICS), sin / cos of el."""
    az, el, _ = _orbit_angles(cam_feat[:, 9:12])  # the position, in units of the default distance
    k = torch.arange(1, POSE_HARMONICS + 1, device=cam_feat.device, dtype=cam_feat.dtype)
    return torch.cat([torch.sin(k * az[:, None]), torch.cos(k * az[:, None]),
                      torch.sin(el)[:, None], torch.cos(el)[:, None]], dim=1)


class BundledUNet(nn.Module):
    """The UNet plus the condition embeddings (see module docstring)."""

    def __init__(self, config: BundledModelConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.unet = BundledUNet2D(
            in_channels=7,
            out_channels=3,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            attention_levels=tuple(config.attention_levels),
            norm_num_groups=config.norm_num_groups,
            attention_head_dim=min(32, min(config.block_out_channels)),
        )
        self.shape_embed = nn.Embedding(len(config.shapes) + 1, d)  # last row: no shape
        self.color_embed = nn.Embedding(len(config.colors) + 1, d)  # last row: no colour
        self.camera_embed = TimestepEmbedding(CAMERA_FEATURES, d)
        self.null_camera = nn.Parameter(torch.zeros(d))
        self.ref_embed = TimestepEmbedding(REF_FEATURES, d)
        if config.shape_camera:
            self.shape_camera_embed = TimestepEmbedding((len(config.shapes) + 1) * POSE_FEATURES, d)
            nn.init.zeros_(self.shape_camera_embed.linear_2.weight)
            nn.init.zeros_(self.shape_camera_embed.linear_2.bias)
        for emb in (self.shape_embed, self.color_embed):
            nn.init.normal_(emb.weight, std=0.02)

    def condition(self, shape_idx, color_idx, cam_feat, cam_present, ref_feat, ref_present) -> torch.Tensor:
        """(B, embed_dim) condition vector. *_idx (B,) long with -1 for absent; *_present (B,) bool."""
        ns, nc = len(self.config.shapes), len(self.config.colors)
        s = torch.where(shape_idx < 0, torch.full_like(shape_idx, ns), shape_idx)
        c = torch.where(color_idx < 0, torch.full_like(color_idx, nc), color_idx)
        cam = torch.where(cam_present[:, None], self.camera_embed(cam_feat), self.null_camera.expand(cam_feat.shape[0], -1))
        ref = self.ref_embed(ref_feat) * ref_present[:, None].float()
        cond = self.shape_embed(s) + self.color_embed(c) + cam + ref
        if self.config.shape_camera:
            onehot = nn.functional.one_hot(s, ns + 1).to(cam_feat.dtype)
            pose = (onehot[:, :, None] * pose_features(cam_feat)[:, None, :]).flatten(1)
            cond = cond + self.shape_camera_embed(pose) * cam_present[:, None].to(cam_feat.dtype)
        return cond

    def forward(self, x_t, t, cond: torch.Tensor, ref_image: torch.Tensor, ref_present: torch.Tensor) -> torch.Tensor:
        """x_t (B,3,H,W), t (B,), cond (B,D), ref_image (B,3,H,W) in [0,1], ref_present (B,) -> (B,3,H,W)."""
        flag = ref_present.float()[:, None, None, None]
        ref = (ref_image * 2 - 1) * flag
        inp = torch.cat([x_t, ref, flag.expand(-1, 1, *x_t.shape[2:])], dim=1)
        return self.unet(inp, t, cond)


def make_scheduler(config: BundledModelConfig, kind: str = "ddpm"):
    """The training (ddpm) or sampling (ddim) scheduler: zero-terminal-SNR, trailing spacing."""
    from diffusers import DDIMScheduler, DDPMScheduler  # only training and sampling need diffusers

    kw = dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=True,
        clip_sample=False,
        timestep_spacing="trailing",
    )
    if kind == "ddpm":
        return DDPMScheduler(**kw)
    if kind == "ddim":
        return DDIMScheduler(**kw)
    raise ValueError(f"unknown scheduler kind {kind!r}; use 'ddpm' or 'ddim'")


def alphas_cumprod(config: BundledModelConfig) -> torch.Tensor:
    """(T,) cumulative alphas of the training schedule: ``make_scheduler(config).alphas_cumprod`` without
    importing diffusers (score distillation needs only these).

    The cosine ("squaredcos_cap_v2") betas, capped at 0.999, rescaled to zero terminal SNR (Lin et al. 2023:
    sqrt(alpha_bar) shifted to end at 0 and stretched back to start where it did).
    """
    if config.beta_schedule != "squaredcos_cap_v2":
        raise ValueError(f"the bundled model uses the squaredcos_cap_v2 schedule, not {config.beta_schedule!r}")
    n = config.num_train_timesteps

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                         dtype=torch.float32)
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    bar = ((root - last) * (first / (first - last))) ** 2
    alphas = torch.cat([bar[:1], bar[1:] / bar[:-1]])
    return torch.cumprod(alphas, dim=0)


WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_model(model: BundledUNet, path: str | Path, half: bool = True) -> None:
    """Write model.safetensors (fp16 when half) + config.json into folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    tmp = path / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / WEIGHTS_NAME)
    (path / CONFIG_NAME).write_text(json.dumps(model.config.to_json(), indent=2) + "\n")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> BundledUNet:
    """Load a folder written by save_model; clear errors for missing or mismatched files."""
    path = Path(path)
    wfile, cfile = path / WEIGHTS_NAME, path / CONFIG_NAME
    for f in (wfile, cfile):
        if not f.is_file():
            raise FileNotFoundError(f"bundled model file missing: {f} (expected {WEIGHTS_NAME} and {CONFIG_NAME} in {path})")
    try:
        config = BundledModelConfig.from_json(json.loads(cfile.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad bundled model config {cfile}: {exc}") from exc
    model = BundledUNet(config)
    state = load_file(str(wfile))
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise ValueError(f"weights in {wfile} do not match the config in {cfile}: {exc}") from exc
    return model.to(device).eval()
