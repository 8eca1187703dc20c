"""Run-time API of the bundled prior: what guidance adapters and pipelines call.

    prior = BundledPrior.load()                    # the shipped weights, CPU, no network
    x = prior.sample("a red cube", cameras)        # (B, 3, H, W) in [0, 1]
    out = prior.predict(x_t, t, "a red cube", cameras, guidance_scale=3.0)

Images live in [0, 1] at the API boundary and in [-1, 1] inside the diffusion
(``x_t``). Cameras are (B, 4, 4) camera-to-world matrices in the engine's
convention (:mod:`engine_server.cameras`), looking at an object normalised to the
unit box; the prior was trained at distances ``camera_ranges["distance"]`` and
vertical FOVs ``camera_ranges["fov"]`` (degrees) on the plain background
``background_rgb``. The model output is a v-prediction (``prediction_type``);
:meth:`BundledPrior.predict_eps` and :meth:`BundledPrior.predict_x0` convert it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from engine_server.models.bundled.model import (
    BundledUNet,
    alphas_cumprod,
    camera_features,
    load_model,
    make_scheduler,
    relative_features,
)
from engine_server.models.bundled.vocab import Caption, UnknownPromptError, parse_prompt, vocabulary

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Folder of the shipped weights (model.safetensors + config.json + MODEL_CARD.md)."""

__all__ = ["BundledPrior", "UnknownPromptError", "DEFAULT_WEIGHTS_DIR", "Reference"]


@dataclass
class Reference:
    """A reference view for image-conditioned (novel view) mode."""

    image: torch.Tensor
    """(3, H, W) in [0, 1], object on the prior's background colour (or (B, 3, H, W), one per row)."""
    c2w: torch.Tensor
    """(4, 4) camera-to-world of the reference view (or (B, 4, 4))."""
    fov: float | None = None
    """Vertical FOV in degrees (None: the prior's default)."""


class BundledPrior:
    """The bundled text-, camera- and image-conditioned pixel diffusion prior."""

    def __init__(self, model: BundledUNet, device: str | torch.device = "cpu", path: Path | None = None):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.path = path
        cfg = model.config
        self.config = cfg
        self.alphas_cumprod = alphas_cumprod(cfg).to(self.device)
        """(T,) cumulative alphas of the training schedule."""
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "BundledPrior":
        """Load weights from ``path`` (default: the shipped ones). Raises FileNotFoundError / ValueError."""
        folder = Path(path) if path is not None else DEFAULT_WEIGHTS_DIR
        if not folder.is_dir():
            raise FileNotFoundError(f"bundled prior folder not found: {folder}")
        return cls(load_model(folder, device), device, folder)

    # ------------------------------------------------------------ properties
    @cached_property
    def scheduler(self):
        """DDIM sampling scheduler (zero-terminal-SNR, trailing spacing, v-prediction); made on first use,
        since only sampling needs diffusers."""
        return make_scheduler(self.config, "ddim")

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        return self.config.resolution

    @property
    def background_rgb(self) -> tuple[float, float, float]:
        """The plain background colour the prior draws objects on."""
        return tuple(self.config.extra.get("background_rgb", (0.0, 0.75, 0.75)))

    @property
    def lighting(self) -> dict:
        """The world-fixed lights of the training renders: {"ambient": a, "lights": [(strength, (x, y, z)), ...]}."""
        from engine_server.models.bundled.procedural import studio_lighting

        return studio_lighting()

    @property
    def camera_ranges(self) -> dict:
        """Training camera ranges: distance, fov, elevation (+ default_distance, default_fov)."""
        return dict(self.config.extra.get("camera", {}))

    @property
    def prediction_type(self) -> str:
        """The network's output: "v_prediction"."""
        return self.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        """Number of training timesteps T (t in [0, T))."""
        return self.config.num_train_timesteps

    @property
    def vocabulary(self) -> dict[str, list[str]]:
        """Known words: colors, shapes, ignored filler, synonyms."""
        return vocabulary()

    @staticmethod
    def parse_prompt(text: str) -> Caption:
        """Parse a prompt; raises UnknownPromptError (a ValueError) listing the known words."""
        return parse_prompt(text)

    # ------------------------------------------------------------ conditioning
    def _condition(self, b: int, prompt: str | Caption | None, cameras: torch.Tensor | None,
                   reference: Reference | tuple | None, fov: torch.Tensor | float | None):
        dev = self.device
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * b
        if len(prompts) != b:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {b}")
        caps = [p if isinstance(p, Caption) else (parse_prompt(p) if p else Caption(None, None)) for p in prompts]
        shape_idx = torch.tensor([c.shape_index for c in caps], dtype=torch.long, device=dev)
        color_idx = torch.tensor([c.color_index for c in caps], dtype=torch.long, device=dev)
        if fov is not None:
            fov = torch.as_tensor(fov, dtype=torch.float32, device=dev).expand(b)
        if cameras is not None:
            cameras = torch.as_tensor(cameras, dtype=torch.float32, device=dev)
            if cameras.shape != (b, 4, 4):
                raise ValueError(f"cameras must be (B, 4, 4) = ({b}, 4, 4) c2w, got {tuple(cameras.shape)}")
            cam_feat = camera_features(cameras, fov)
            cam_present = torch.ones(b, dtype=torch.bool, device=dev)
        else:
            cam_feat = torch.zeros(b, 13, device=dev)
            cam_present = torch.zeros(b, dtype=torch.bool, device=dev)
        res = self.resolution
        if reference is not None:
            if isinstance(reference, tuple):
                reference = Reference(*reference)
            if cameras is None:
                raise ValueError("image-conditioned mode needs target cameras")
            img = torch.as_tensor(reference.image, dtype=torch.float32, device=dev)
            if img.shape not in ((3, res, res), (b, 3, res, res)):
                raise ValueError(f"reference image must be (3, {res}, {res}) or (B, 3, {res}, {res}) in [0, 1], "
                                 f"got {tuple(img.shape)}")
            rc2w = torch.as_tensor(reference.c2w, dtype=torch.float32, device=dev).reshape(-1, 4, 4).expand(b, 4, 4)
            rfov = None if reference.fov is None else torch.full((b,), float(reference.fov), device=dev)
            ref_feat = torch.cat([camera_features(rc2w, rfov), relative_features(cameras, rc2w)], dim=1)
            ref_img = img.expand(b, -1, -1, -1) if img.dim() == 4 else img[None].expand(b, -1, -1, -1)
            ref_present = torch.ones(b, dtype=torch.bool, device=dev)
        else:
            ref_feat = torch.zeros(b, 17, device=dev)
            ref_img = torch.zeros(b, 3, res, res, device=dev)
            ref_present = torch.zeros(b, dtype=torch.bool, device=dev)
        return shape_idx, color_idx, cam_feat, cam_present, ref_feat, ref_present, ref_img

    # ------------------------------------------------------------ model calls
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, prompt: str | Caption | None = None,
                cameras: torch.Tensor | None = None, reference: Reference | tuple | None = None,
                guidance_scale: float = 1.0, fov: torch.Tensor | float | None = None) -> torch.Tensor:
        """Model output (B, 3, H, W) (a v-prediction) for noisy images x_t (B, 3, H, W) in [-1, 1] scale.

        t: (B,) long timesteps in [0, num_train_timesteps). prompt: text (parsed, see
        :meth:`parse_prompt`), a list of B texts (one per row), or None. cameras: (B, 4, 4)
        c2w or None. reference: (image (3, H, W) in [0, 1], c2w (4, 4)) or :class:`Reference`
        (per-row images (B, 3, H, W) and c2w (B, 4, 4) also accepted), or None.
        With guidance_scale != 1 the unconditional branch (no prompt, no reference,
        same cameras) is batched with the conditional one and mixed
        ``u + s * (c - u)``. Gradients flow to x_t (the weights are frozen).
        """
        b = x_t.shape[0]
        if x_t.dim() != 4 or x_t.shape[1:] != (3, self.resolution, self.resolution):
            raise ValueError(f"x_t must be (B, 3, {self.resolution}, {self.resolution}), got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(b)
        cond = self._condition(b, prompt, cameras, reference, fov)
        if guidance_scale == 1.0:
            return self._forward(x_t, t, *cond)
        uncond = self._condition(b, None, cameras, None, fov)
        both = [torch.cat([c, u]) for c, u in zip(cond, uncond)]
        out = self._forward(torch.cat([x_t, x_t]), torch.cat([t, t]), *both)
        c_out, u_out = out.chunk(2)
        return u_out + guidance_scale * (c_out - u_out)

    def _forward(self, x_t, t, shape_idx, color_idx, cam_feat, cam_present, ref_feat, ref_present, ref_img):
        emb = self.model.condition(shape_idx, color_idx, cam_feat, cam_present, ref_feat, ref_present)
        return self.model(x_t, t, emb, ref_img, ref_present)

    def _ab(self, x_t, t):
        acp = self.alphas_cumprod[t].to(x_t.dtype)
        return acp.sqrt()[:, None, None, None], (1 - acp).sqrt()[:, None, None, None]

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Noise estimate from a v-prediction: eps = sqrt(acp) v + sqrt(1 - acp) x_t."""
        a, s = self._ab(x_t, torch.as_tensor(t, device=self.device).long().reshape(-1).expand(x_t.shape[0]))
        return a * v + s * x_t

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Clean-image estimate in [-1, 1] scale from a v-prediction: x0 = sqrt(acp) x_t - sqrt(1 - acp) v."""
        a, s = self._ab(x_t, torch.as_tensor(t, device=self.device).long().reshape(-1).expand(x_t.shape[0]))
        return a * x_t - s * v

    @torch.no_grad()
    def sample(self, prompt: str | Caption | None, cameras: torch.Tensor, reference: Reference | tuple | None = None,
               steps: int = 30, guidance_scale: float = 2.0, generator: torch.Generator | None = None,
               fov: torch.Tensor | float | None = None) -> torch.Tensor:
        """DDIM samples (B, 3, H, W) in [0, 1], one per camera in cameras (B, 4, 4)."""
        cameras = torch.as_tensor(cameras, dtype=torch.float32, device=self.device)
        b, res = cameras.shape[0], self.resolution
        sched = make_scheduler(self.config, "ddim")  # a fresh one: set_timesteps changes it
        sched.set_timesteps(steps, device=self.device)
        x = torch.randn(b, 3, res, res, generator=generator).to(self.device)
        for t in sched.timesteps:
            tt = torch.full((b,), int(t), dtype=torch.long, device=self.device)
            out = self.predict(x, tt, prompt, cameras, reference, guidance_scale, fov)
            x = sched.step(out, t, x).prev_sample
        return ((x + 1) / 2).clamp(0, 1)
