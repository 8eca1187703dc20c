"""The `nvdiffrast` rasterizer backend: a thin adapter over nvdiffrast (Laine et al. 2020), CUDA only.

nvdiffrast's rast layout is the reference's (u, v weight vertices 0 and 1, z/w, id + 1);
only its image rows run bottom-up. Negating clip y maps nvdiffrast's row 0 (NDC y = -1)
to NDC y = +1, so its output comes out top-row-first like the reference, and the same
flipped positions go to `antialias`. Drawing with y negated reverses the winding on
screen, which does not matter: nvdiffrast does not cull.
"""
from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from kernels.rasterize.backends import RasterOps
from kernels.registry import BackendStatus, BackendUnavailableError

logger = logging.getLogger(__name__)

_FLIP_Y = (1.0, -1.0, 1.0, 1.0)


def _tri(faces: torch.Tensor) -> torch.Tensor:
    return faces.to(torch.int32).contiguous()


class NvdiffrastOps:
    """nvdiffrast's rasterize / interpolate / antialias with the reference's conventions."""

    def __init__(self) -> None:
        import nvdiffrast.torch as dr  # noqa: PLC0415  (imported only when this backend is chosen)

        self.dr = dr
        self._contexts: dict[int, object] = {}

    def _context(self, device: torch.device) -> object:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._contexts:
            logger.debug("creating nvdiffrast CUDA context on cuda:%d", index)
            self._contexts[index] = self.dr.RasterizeCudaContext(device=torch.device("cuda", index))
        return self._contexts[index]

    @staticmethod
    def _flip(clip: torch.Tensor) -> torch.Tensor:
        clip = clip.to(torch.float32)
        return (clip * clip.new_tensor(_FLIP_Y)).contiguous()

    def rasterize(self, clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        ctx = self._context(clip.device)
        rast, _ = self.dr.rasterize(ctx, self._flip(clip), _tri(faces), resolution=list(resolution))
        return rast

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        out, _ = self.dr.interpolate(attr.to(torch.float32).contiguous(), rast.contiguous(), _tri(faces))
        return out

    def antialias(
        self, color: torch.Tensor, rast: torch.Tensor, clip: torch.Tensor, faces: torch.Tensor
    ) -> torch.Tensor:
        color = color.to(torch.float32).contiguous()
        return self.dr.antialias(color, rast.contiguous(), self._flip(clip), _tri(faces))


@functools.cache
def probe() -> BackendStatus:
    """Cheap: nvdiffrast installed (not imported) and a CUDA device; neither changes while running, so cached."""
    try:
        found = importlib.util.find_spec("nvdiffrast") is not None
    except (ImportError, ValueError) as exc:
        return BackendStatus(False, f"nvdiffrast not importable: {exc}")
    if not found:
        return BackendStatus(
            False, "nvdiffrast is not installed (pip install git+https://github.com/NVlabs/nvdiffrast)"
        )
    if not torch.cuda.is_available():
        return BackendStatus(False, "nvdiffrast is installed but CUDA is not available")
    return BackendStatus(True, "nvdiffrast CUDA rasterizer", ("cuda",))


def load() -> RasterOps:
    """Imports nvdiffrast; returns its ops with the reference's conventions."""
    try:
        ops = NvdiffrastOps()
    except ImportError as exc:  # also nvdiffrast's own errors when its CUDA plugin cannot load
        raise BackendUnavailableError(f"rasterizer backend 'nvdiffrast' is unavailable: {exc}") from exc
    return RasterOps(rasterize=ops.rasterize, interpolate=ops.interpolate, antialias=ops.antialias)
