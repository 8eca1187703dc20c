"""Radiance field, backgrounds, occupancy grid and volume renderer.

    from engine_server.field import FieldConfig, RadianceField, VolumeRenderer, FixedBackground
    field = RadianceField(FieldConfig())
    out = VolumeRenderer().render(field, rays_o, rays_d, FixedBackground((1, 1, 1)))
"""
from __future__ import annotations

from engine_server.field.background import FixedBackground, MLPBackground, MLPBackgroundConfig, background_likeness
from engine_server.field.network import FieldConfig, RadianceField, trunc_exp
from engine_server.field.occupancy import OccupancyConfig, OccupancyGrid
from engine_server.field.renderer import RendererConfig, VolumeRenderer, intersect_aabb, render_camera, surface_albedo

__all__ = [
    "FieldConfig",
    "FixedBackground",
    "MLPBackground",
    "MLPBackgroundConfig",
    "OccupancyConfig",
    "OccupancyGrid",
    "RadianceField",
    "RendererConfig",
    "VolumeRenderer",
    "background_likeness",
    "intersect_aabb",
    "render_camera",
    "surface_albedo",
    "trunc_exp",
]
