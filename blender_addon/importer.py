"""Engine arrays -> Blender mesh, material and images (main thread only).

Meshes are filled with ``foreach_set`` from numpy arrays (no per-vertex Python loop):
a 100k-face import takes well under half a second (see ``bench.py``). UVs arrive in
glTF's convention (top-left origin) and are flipped for Blender; the base colour and the
tangent-space normal map arrive as the engine's PNGs and are packed as they are (the normal
map as Non-Color data through a Normal Map node, as Blender's glTF importer connects it),
roughness and metallic as the engine wrote them into the GLB.
"""
from __future__ import annotations

import logging
import os
import tempfile

import bpy
import numpy as np

from .arrays import blender_uvs, mean_colour, resting

logger = logging.getLogger(__name__)

PREVIEW_IMAGE = "Generate3D Preview"
"""Name of the image holding the latest preview render."""
PREVIEW_SIZE = 256
"""Pixels of the preview image's longer side after enlarging a small render."""


def fill_mesh(mesh: bpy.types.Mesh, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None) -> None:
    """Replace ``mesh``'s geometry: vertices (V, 3) float, faces (F, 3) int, uvs (V, 2) glTF convention or None."""
    v = np.ascontiguousarray(vertices, dtype=np.float32).reshape(-1, 3)
    f = np.ascontiguousarray(faces, dtype=np.int32).reshape(-1, 3)
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError(f"face indices span [{f.min()}, {f.max()}] but the mesh has {len(v)} vertices")
    mesh.clear_geometry()
    mesh.vertices.add(len(v))
    mesh.vertices.foreach_set("co", v.ravel())
    mesh.loops.add(f.size)
    mesh.loops.foreach_set("vertex_index", f.ravel())
    mesh.polygons.add(len(f))
    mesh.polygons.foreach_set("loop_start", np.arange(0, f.size, 3, dtype=np.int32))
    if bpy.app.version < (4, 0, 0):  # loop_total became derived from loop_start in 4.0
        mesh.polygons.foreach_set("loop_total", np.full(len(f), 3, dtype=np.int32))
    if uvs is not None:
        layer = mesh.uv_layers.new(name="UVMap")
        layer.data.foreach_set("uv", blender_uvs(uvs, f).ravel())
    mesh.update(calc_edges=True)
    if hasattr(mesh, "shade_smooth"):
        mesh.shade_smooth()
    else:
        mesh.polygons.foreach_set("use_smooth", np.ones(len(f), dtype=bool))


def image_from_png(name: str, png: bytes, *, pack: bool = True, existing: bpy.types.Image | None = None) -> bpy.types.Image:
    """A Blender image from PNG bytes (packed into the .blend unless ``pack`` is False).

    Blender reads images from files only, so the bytes go through a temporary file
    that is deleted again (a packed image keeps its own copy).
    """
    fd, path = tempfile.mkstemp(suffix=".png", prefix="generate3d-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        if existing is not None:
            if existing.packed_file is not None:
                existing.unpack(method="REMOVE")
            existing.filepath = path
            existing.reload()
            image = existing
        else:
            image = bpy.data.images.load(path, check_existing=False)
            image.name = name
        image.pack()
        image.filepath = ""  # nothing on disk refers to it any more
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    return image


def textured_material(name: str, image: bpy.types.Image | None, normal_image: bpy.types.Image | None = None,
                      factors: dict | None = None) -> bpy.types.Material:
    """A material whose Principled BSDF's Base Color is fed by an Image Texture node holding ``image``, its Normal
    by a tangent-space Normal Map node reading ``normal_image`` (Non-Color), with ``factors``' ``roughness`` /
    ``metallic`` (absent: Blender's defaults)."""
    mat = bpy.data.materials.new(name)
    if not mat.use_nodes:
        mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:
        bsdf = nodes.new("ShaderNodeBsdfPrincipled")
        out = next((n for n in nodes if n.type == "OUTPUT_MATERIAL"), None) or nodes.new("ShaderNodeOutputMaterial")
        links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    if image is not None:
        tex = nodes.new("ShaderNodeTexImage")
        tex.image = image
        tex.extension = "EXTEND"
        tex.location = (bsdf.location.x - 320, bsdf.location.y)
        links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    if normal_image is not None:
        normal_image.colorspace_settings.name = "Non-Color"  # directions, not colours
        tex = nodes.new("ShaderNodeTexImage")
        tex.image = normal_image
        tex.extension = "EXTEND"
        tex.location = (bsdf.location.x - 520, bsdf.location.y - 300)
        normal_map = nodes.new("ShaderNodeNormalMap")
        normal_map.space = "TANGENT"  # MikkTSpace of the UV map, the convention the engine bakes in
        normal_map.location = (bsdf.location.x - 220, bsdf.location.y - 300)
        links.new(tex.outputs["Color"], normal_map.inputs["Color"])
        links.new(normal_map.outputs["Normal"], bsdf.inputs["Normal"])
    for key, socket in (("roughness", "Roughness"), ("metallic", "Metallic")):
        if factors and factors.get(key) is not None:
            bsdf.inputs[socket].default_value = float(factors[key])
            setattr(mat, key, float(factors[key]))  # the viewport's Solid / Workbench shading
    return mat


def create_object(name: str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None,
                  texture_png: bytes | None = None, matrix: list[float] | None = None, *, rest: bool = False,
                  context=None, normal_png: bytes | None = None, factors: dict | None = None) -> bpy.types.Object:
    """A new smooth-shaded mesh object in the active collection, selected and active, textured when a PNG is given
    (``normal_png``: the tangent-space normal map; ``factors``: the material's roughness / metallic).

    ``rest``: move the mesh so that the object's origin is its bottom centre (lowest point at the
    origin's height, centred in x/y), so at ``matrix`` it stands on that point. The viewport display
    colour (Solid view) is the texture's mean colour.
    """
    context = context or bpy.context
    mesh = bpy.data.meshes.new(name)
    fill_mesh(mesh, resting(vertices) if rest else vertices, faces, uvs)
    obj = bpy.data.objects.new(name, mesh)
    image = image_from_png(f"{name} texture", texture_png) if texture_png else None
    normal_image = image_from_png(f"{name} normal", normal_png) if normal_png and uvs is not None else None
    mat = textured_material(name, image, normal_image, factors)
    if image is not None:
        mat.diffuse_color = obj.color = _image_mean_colour(image)
    mesh.materials.append(mat)
    if matrix is not None:
        obj.matrix_world = _matrix(matrix)
    collection = getattr(context, "collection", None) or context.scene.collection
    collection.objects.link(obj)
    view_layer = getattr(context, "view_layer", None)
    if view_layer is not None:
        # A freshly linked object's base may not be synced into the view layer yet (bpy 5.0:
        # ``obj.name in view_layer.objects`` is False); selecting and activating it works regardless.
        for other in view_layer.objects:
            if other.select_get(view_layer=view_layer):
                other.select_set(False, view_layer=view_layer)
        obj.select_set(True, view_layer=view_layer)
        view_layer.objects.active = obj
    return obj


def _image_mean_colour(image: bpy.types.Image) -> tuple[float, float, float, float]:
    px = np.empty(image.size[0] * image.size[1] * image.channels, dtype=np.float32)
    image.pixels.foreach_get(px)
    return mean_colour(px, image.channels)


def update_preview_object(name: str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None,
                          matrix: list[float] | None = None, *, rest: bool = False) -> bpy.types.Object:
    """Create, or update in place, the one preview object ``name`` showing an intermediate mesh (``rest``: as in
    :func:`create_object`)."""
    obj = bpy.data.objects.get(name)
    if obj is None or obj.type != "MESH":
        obj = bpy.data.objects.new(name, bpy.data.meshes.new(name))
        bpy.context.scene.collection.objects.link(obj)
        obj.display_type = "SOLID"
    fill_mesh(obj.data, resting(vertices) if rest else vertices, faces, uvs)
    if matrix is not None:
        obj.matrix_world = _matrix(matrix)
    return obj


def remove_object(name: str) -> None:
    """Delete the object ``name`` and its mesh, if they exist."""
    obj = bpy.data.objects.get(name)
    if obj is None:
        return
    mesh = obj.data if obj.type == "MESH" else None
    bpy.data.objects.remove(obj, do_unlink=True)
    if mesh is not None and mesh.users == 0:
        bpy.data.meshes.remove(mesh)


def show_preview(png: bytes) -> bpy.types.Image:
    """Put the latest preview render into the image PREVIEW_IMAGE (created once, then replaced in place), enlarged
    with nearest-neighbour sampling to about PREVIEW_SIZE pixels: the panel shows crisp pixels, not a blurred
    32 px render."""
    image = image_from_png(PREVIEW_IMAGE, png, existing=bpy.data.images.get(PREVIEW_IMAGE))
    width, height = image.size
    factor = PREVIEW_SIZE // max(width, height, 1)
    if factor > 1:
        px = np.empty(width * height * image.channels, dtype=np.float32)
        image.pixels.foreach_get(px)
        big = px.reshape(height, width, image.channels).repeat(factor, axis=0).repeat(factor, axis=1)
        image.scale(width * factor, height * factor)  # resizes the buffer; its filtered pixels are replaced next
        image.pixels.foreach_set(big.ravel())
        image.update()
        image.pack()  # the enlarged pixels are what the .blend keeps
    if hasattr(image, "preview_ensure"):
        image.preview_ensure()
        if image.preview is not None:
            image.preview.reload()
    return image


def _matrix(rows: list[float]):
    import mathutils

    flat = [float(x) for x in np.asarray(rows, dtype=np.float64).reshape(-1)]
    return mathutils.Matrix([flat[0:4], flat[4:8], flat[8:12], flat[12:16]])
