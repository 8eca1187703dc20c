"""Geometry: tetrahedral grids, marching tetrahedra, surface subdivision and DMTet.

Sign convention everywhere: an SDF is negative inside and positive outside; extracted
triangles face outward (counter-clockwise seen from outside, positive signed volume).
"""
from __future__ import annotations

from engine_server.geometry.dmtet import DMTet, DMTetConfig
from engine_server.geometry.marching_tets import marching_tets
from engine_server.geometry.mesh_sdf import (
    MeshTransform,
    mesh_to_sdf,
    normalize_mesh,
    unsigned_distance,
    winding_number,
)
from engine_server.geometry.mesh_utils import (
    MeshStats,
    chamfer_distance,
    chamfer_loss,
    MIN_PIECE_FRACTION,
    clean_mesh,
    mesh_stats,
    sample_points_on_mesh,
)
from engine_server.geometry.regularizers import (
    deformation_loss,
    laplacian_smoothness_loss,
    normal_consistency_loss,
    sdf_sign_flip_loss,
)
from engine_server.geometry.subdivide import Subdivision, subdivide_surface
from engine_server.geometry.tet_grid import grid_spacing, surface_tet_candidates, tet_grid

__all__ = [
    "DMTet",
    "DMTetConfig",
    "MeshStats",
    "MeshTransform",
    "Subdivision",
    "chamfer_distance",
    "chamfer_loss",
    "MIN_PIECE_FRACTION",
    "clean_mesh",
    "deformation_loss",
    "grid_spacing",
    "laplacian_smoothness_loss",
    "marching_tets",
    "mesh_stats",
    "mesh_to_sdf",
    "normal_consistency_loss",
    "normalize_mesh",
    "sample_points_on_mesh",
    "sdf_sign_flip_loss",
    "subdivide_surface",
    "surface_tet_candidates",
    "tet_grid",
    "unsigned_distance",
    "winding_number",
]
