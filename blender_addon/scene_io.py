"""Scene data -> wire format: camera rig, placement, the mesh sent for refinement, overrides, the reference PNG.

Main thread only.
"""
from __future__ import annotations

import array
import math
import os
import tempfile

import bpy
import numpy as np


def matrix_rows(matrix) -> list[list[float]]:
    """A ``mathutils.Matrix`` 4x4 as row lists of floats."""
    return [[float(x) for x in row] for row in matrix]


def camera_rig(objects, scene: bpy.types.Scene) -> list[dict]:
    """The perspective camera objects among ``objects`` as rig entries: matrix_world, fov_y_deg, width, height.

    Width and height are the scene's render resolution (percentage applied); the
    vertical field of view follows the camera's sensor fit as Blender renders it.
    """
    render = scene.render
    scale = render.resolution_percentage / 100.0
    width = max(1, int(render.resolution_x * scale))
    height = max(1, int(render.resolution_y * scale))
    aspect = (width * render.pixel_aspect_x) / (height * render.pixel_aspect_y)
    rig = []
    for obj in objects:
        if obj.type != "CAMERA" or obj.data.type != "PERSP":
            continue
        cam = obj.data
        fit = cam.sensor_fit
        if fit == "AUTO":
            fit = "HORIZONTAL" if aspect >= 1.0 else "VERTICAL"
        half = math.atan(cam.sensor_height / (2 * cam.lens)) if cam.sensor_fit == "VERTICAL" else math.atan(cam.sensor_width / (2 * cam.lens))
        fov_y = 2 * math.atan(math.tan(half) / aspect) if fit == "HORIZONTAL" else 2 * half
        rig.append({"matrix_world": matrix_rows(obj.matrix_world), "fov_y_deg": math.degrees(fov_y),
                    "width": width, "height": height})
    return rig


def evaluated_triangles(obj: bpy.types.Object, depsgraph) -> tuple[np.ndarray, np.ndarray]:
    """The object's evaluated mesh (modifiers applied) in its local frame, triangulated.

    Returns vertices (V, 3) float32 and faces (F, 3) int32. The object itself is only read.
    """
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        mesh.calc_loop_triangles()
        vertices = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", vertices)
        faces = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int32)
        mesh.loop_triangles.foreach_get("vertices", faces)
    finally:
        evaluated.to_mesh_clear()
    return vertices.reshape(-1, 3), faces.reshape(-1, 3)


def beside(obj: bpy.types.Object, gap: float = 0.2) -> list[list[float]]:
    """A world matrix like ``obj``'s, moved along world +X by its width (plus ``gap`` of it)."""
    corners = np.array([list(obj.matrix_world @ _vec(c)) for c in obj.bound_box])
    width = float(corners[:, 0].max() - corners[:, 0].min()) if len(corners) else 1.0
    rows = matrix_rows(obj.matrix_world)
    rows[0][3] += max(width, 1e-3) * (1.0 + gap)
    return rows


def _vec(c):
    import mathutils

    return mathutils.Vector(c)


def parse_overrides(text: str) -> dict:
    """The panel's "name=value ..." overrides as a dict (booleans, ints and floats converted); raises ValueError."""
    out: dict = {}
    for item in text.replace(",", " ").split():
        if "=" not in item:
            raise ValueError(f"override '{item}' is not name=value")
        key, value = item.split("=", 1)
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def image_png(image: bpy.types.Image) -> bytes:
    """A Blender image as PNG bytes (saved through a temporary copy; the image itself is untouched)."""
    fd, path = tempfile.mkstemp(suffix=".png", prefix="generate3d-ref-")
    os.close(fd)
    if image.type == "RENDER_RESULT":  # its pixels are not readable: saved as the render's own output
        try:
            settings = bpy.context.scene.render.image_settings
            fmt, settings.file_format = settings.file_format, "PNG"
            try:
                image.save_render(path)
            finally:
                settings.file_format = fmt
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.remove(path)
    copy = image.copy()
    try:
        # A copy of a generated or painted image may come back from its source, not from what is in
        # memory: carry the current pixels over explicitly.
        pixels = array.array("f", bytes(4 * len(image.pixels)))
        image.pixels.foreach_get(pixels)
        copy.pixels.foreach_set(pixels)
        copy.filepath_raw = path
        copy.file_format = "PNG"
        copy.save()
        with open(path, "rb") as f:
            return f.read()
    finally:
        bpy.data.images.remove(copy)
        os.remove(path)
