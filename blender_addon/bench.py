"""Benchmark: importing an engine result into Blender (mesh via ``foreach_set``, material, packed texture).

``run(args)`` starts Blender-as-a-module (``bpy``) in a child process, so the caller
never imports ``bpy``; the child builds a ``faces``-triangle grid (default 100k)
with per-vertex UVs and a ``texture``-pixel PNG and times
:func:`blender_addon.importer.create_object` (the whole import: mesh, UVs, smooth
shading, material, packed image) next to the bare mesh fill and to
``Mesh.from_pydata`` on the same data. Options read from ``args``: repeat (5),
faces (100000), texture (1024).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, {root!r})
import bpy
from blender_addon import importer
from engine_server.service.bench import bench_result  # the object the server bench sends

vertices, faces, uvs, png = bench_result({faces}, {texture})
repeat = {repeat}
bpy.ops.wm.read_factory_settings(use_empty=True)

def timed(fn):
    out = []
    for r in range(repeat):
        t = time.perf_counter(); fn(r); out.append((time.perf_counter() - t) * 1e3)
    return out

rows = []
ms = timed(lambda r: importer.create_object(f"bench{{r}}", vertices, faces, uvs, png, None))
obj = bpy.data.objects["bench0"]
assert len(obj.data.polygons) == len(faces) and len(obj.data.vertices) == len(vertices)
rows.append(("import: mesh + UVs + material + packed texture", ms))
def fill(r):
    m = bpy.data.meshes.new(f"fill{{r}}"); importer.fill_mesh(m, vertices, faces, uvs)
rows.append(("mesh + UVs only (foreach_set)", timed(fill)))
def pydata(r):
    m = bpy.data.meshes.new(f"py{{r}}"); m.from_pydata(vertices.tolist(), [], faces.tolist()); m.update()
rows.append(("mesh only, Mesh.from_pydata (reference)", timed(pydata)))
print("BENCH" + json.dumps({{"rows": [{{"measure": n, "faces": len(faces), "vertices": len(vertices),
    "median_ms": statistics.median(t), "max_ms": max(t), "repeat": len(t)}} for n, t in rows],
    "blender": bpy.app.version_string}}))
"""


def run(args) -> dict:
    """Time the import of a ``faces``-triangle textured result into Blender (bpy in a child process)."""
    repeat = max(1, int(getattr(args, "repeat", 5)))
    faces = int(getattr(args, "faces", 100_000))
    texture = int(getattr(args, "texture", 1024))
    code = _CHILD.format(root=str(ROOT), faces=faces, texture=texture, repeat=repeat)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the Blender benchmark child failed (needs bpy==5.0.1):\n{proc.stderr[-3000:]}")
    data = json.loads(line[len("BENCH"):])
    return {
        "title": f"Blender import of an engine result (bpy {data['blender']}, child process)",
        "rows": data["rows"],
        "notes": [
            "import: blender_addon.importer.create_object = foreach_set vertices/loops/polygons, per-loop UVs, "
            f"smooth shading, Principled BSDF material, {texture}^2 PNG packed into the .blend; target < 500 ms at 100k faces",
            "from_pydata is the slow reference on the same arrays (Python lists)",
        ],
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--texture", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    print(json.dumps(run(parser.parse_args()), indent=1))
