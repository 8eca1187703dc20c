"""Engine server: text / image / mesh to textured 3D objects for Blender.

Importing this package pulls in no torch: the wire protocol and client must be
importable inside Blender, which has no torch.
"""
from __future__ import annotations

__version__ = "0.1.0"
