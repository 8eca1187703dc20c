"""Generate 3D: a Blender add-on that turns a prompt, an image or a rough mesh into a textured object.

The heavy work runs in a separate engine server (``engine-server serve``); this
add-on talks to it through the engine's own client and protocol modules, which
``build_addon.py`` copies into the built zip as ``engine_client`` (never kept here
by hand). Blender 4.2+ installs the zip as an extension (``blender_manifest.toml``,
pyzmq wheels bundled); older Blender installs it as a legacy add-on (``bl_info``).

Submodules touching ``bpy`` are imported in :func:`register`, so importing this
package (e.g. for ``bench``) costs nothing until Blender registers it.
"""
from __future__ import annotations

import atexit

bl_info = {
    "name": "Generate 3D",
    "author": "engine-server authors",
    "version": (0, 1, 0),
    "blender": (3, 4, 0),
    "location": "View3D > Sidebar > Generate",
    "description": "Text, image or mesh to a textured 3D object, made by a local engine server",
    "category": "3D View",
}

_registered: list = []


def register() -> None:
    """Register the preferences, the scene settings, the operators and the panel."""
    import bpy

    from . import operators, panel, props, runtime

    classes = (props.Generate3DPreferences, props.Generate3DSettings, *operators.classes, *panel.classes)
    for cls in classes:
        bpy.utils.register_class(cls)
        _registered.append(cls)
    bpy.types.Scene.generate3d = bpy.props.PointerProperty(type=props.Generate3DSettings)
    bpy.types.STATUSBAR_HT_header.append(panel.draw_status)
    atexit.register(runtime.close_at_exit)
    runtime.preload()


def unregister() -> None:
    """Stop the timer, close the engine connection (no thread or socket left) and unregister everything."""
    import bpy

    from . import panel, runtime

    atexit.unregister(runtime.close_at_exit)
    runtime.shutdown()
    bpy.types.STATUSBAR_HT_header.remove(panel.draw_status)
    if hasattr(bpy.types.Scene, "generate3d"):
        del bpy.types.Scene.generate3d
    while _registered:
        bpy.utils.unregister_class(_registered.pop())
