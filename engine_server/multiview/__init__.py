"""Multi-view generation: N views of one object that agree, from a prompt or a reference image.

    from engine_server.multiview import MultiViewConfig, ViewReference, default_rig, generate_views
    rig = default_rig(7, distance=2.5, fov_y_deg=42.0, resolution=32)   # 6-view ring + overhead
    result = generate_views(prior, rig, prompt="a red cube")            # or reference=ViewReference(...)
    result.images (N, 3, R, R), result.c2w (N, 4, 4), result.masks (N, R, R), result.agreement (N,)

Names are imported lazily, so ``engine_server.cli.make`` (the CLI) loads without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "STRATEGIES": "generate", "MultiViewConfig": "generate", "PriorSampler": "sampler", "scheduler_for": "sampler",
    "MultiViewResult": "generate", "ViewReference": "generate", "generate_views": "generate",
    "AGREEMENT_THRESHOLD": "rig", "DEFAULT_ELEVATION": "rig", "OVERHEAD_ELEVATION": "rig", "background_mask": "rig", "default_rig": "rig",
    "mask_iou": "rig", "project_points": "rig", "silhouette_agreement": "rig",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"engine_server.multiview.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'engine_server.multiview' has no attribute {name!r}")
