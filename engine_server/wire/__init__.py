"""The wire between Blender and the engine, free of torch and bpy: one source for both sides.

- :mod:`~engine_server.wire.auth`: the per-install key file, HMAC signing, the replay guard;
- :mod:`~engine_server.wire.protocol`: frames, limits and every message's fields (the submit contract);
- :mod:`~engine_server.wire.client`: the DEALER client the add-on and scripts use.

``build_addon.py`` copies this folder into the add-on, so nothing here may import
anything from ``engine_server`` outside ``wire``.
"""
