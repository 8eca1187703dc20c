"""The engine runner's export formats: ``options.format`` writes that format beside the GLB, stored with the result.

Runs the real engine in-process (bundled prior, a few coarse steps on the CPU) with the job
store's own ``write_result`` / ``result_message_fields``, as the worker and server use them.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import trimesh
from PIL import Image

from engine_server.export import glb_facts, usd_available
from engine_server.service.jobs import JobStore
from engine_server.service.runner import EngineRunner, RunnerConfig

pytestmark = pytest.mark.slow  # one real job per format: a few seconds each on 2 cores

TINY = {"coarse_steps": 2, "tet_resolution": 24, "texture_size": 32, "preview_every": 1000}


class Sink:
    """An EventSink that drops what it is told."""

    def progress(self, *args, **kwargs) -> None: ...
    def preview(self, *args, **kwargs) -> None: ...
    def mesh(self, *args, **kwargs) -> None: ...


@pytest.fixture(scope="module")
def runner() -> EngineRunner:
    return EngineRunner(RunnerConfig(device="cpu"))


@pytest.fixture()
def store(tmp_path):
    s = JobStore(tmp_path / "data")
    yield s
    s.close()


def run_job(runner, store, fmt: str | None):
    options = dict(TINY, **({"format": fmt} if fmt else {}))
    request = {"kind": "text", "prompt": "a red cube", "seed": 1, "options": options}
    job = store.submit(f"r-{fmt}", request)[0]
    store.claim_next()
    return job.id, runner(request, store.job_dir(job.id), Sink(), lambda: False)


@pytest.mark.parametrize("fmt", [None, "obj", pytest.param("usdz", marks=pytest.mark.skipif(
    not usd_available(), reason="usd-core is not installed: pip install 'engine-server[usd]'"))])
def test_the_format_is_written_beside_the_glb_and_stored_with_the_result(runner, store, fmt):
    job_id, result = run_job(runner, store, fmt)
    glb = glb_facts(result.glb_path)
    assert result.normal_png == glb.normal_png and result.texture_png == glb.texture_png
    assert result.meta["material"] == {"metallic": glb.metallic, "roughness": glb.roughness}
    store.write_result(job_id, result)
    store.finish(job_id, "done")
    fields = store.result_message_fields(job_id)
    export = fields["meta"]["export"]
    if fmt is None:
        assert export == {"format": "glb", "file": "model.glb", "files": []} and "files" not in fields
        return
    assert export["format"] == fmt and export["file"] == f"model.{fmt}"
    assert sorted(fields["files"]) == export["files"]
    assert "files" not in store.result_message_fields(job_id, glb=False)  # an importer asks for arrays only
    faces = fields["arrays"]["faces"].numpy()
    if fmt == "obj":
        normal = ["model_normal.png"] if glb.normal_png is not None else []
        assert export["files"] == ["model.mtl", "model.obj", "model_basecolor.png", *normal]
        folder = store.job_dir(job_id) / "result" / "files"
        mesh = trimesh.load(folder / "model.obj", force="mesh", process=False, maintain_order=True)
        np.testing.assert_array_equal(mesh.faces, faces)
        texture = np.asarray(Image.open(io.BytesIO(bytes(fields["files"]["model_basecolor.png"].data))))
        np.testing.assert_array_equal(texture, np.asarray(Image.open(io.BytesIO(glb.texture_png))))
    else:
        assert export["files"] == ["model.usdz"] and bytes(fields["files"]["model.usdz"].data)[:2] == b"PK"

