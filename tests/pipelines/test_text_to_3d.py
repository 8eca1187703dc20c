"""Text-to-3D on the real bundled prior at a tiny step count: stages, events, GLB, sidecar, resume, cancel.

Quality (shape and colour of the result) is asserted by the prompt tests of
issue 7 once the bundled prior is fully trained; here the pipeline's mechanics.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from engine_server.export import load_glb
from engine_server.pipelines.events import Cancelled
from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest, otsu_threshold

TINY = {"coarse_steps": 4, "views_per_step": 2, "tet_resolution": 24, "texture_size": 64,
        "preview_every": 2, "checkpoint_every": 2}


def _request(**kw) -> TextTo3DRequest:
    return TextTo3DRequest(prompt=kw.pop("prompt", "a red cube"), seed=kw.pop("seed", 3), overrides=dict(TINY), **kw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("t2d") / "cube.glb"
    events = []
    pipe = TextTo3D(_request(), progress=events.append, checkpoint_dir=out.parent / "ckpt")
    result = pipe.run(out)
    return pipe, result, events, out


def test_stages_report_in_order_with_previews_and_a_mesh(tiny_run):
    _, _, events, _ = tiny_run
    stages = [e.stage for e in events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["coarse", "extract", "texture", "export"]
    coarse = [e for e in events if e.stage == "coarse"]
    assert [e.step for e in coarse] == [0, 1, 2, 3, 4] and all(e.total == 4 for e in coarse)
    assert coarse[0].loss is None and all(np.isfinite(e.loss) for e in coarse[1:])
    previews = [e for e in coarse if e.preview is not None]
    assert [e.step for e in previews] == [2, 4]
    assert previews[0].preview.dtype == np.uint8 and previews[0].preview.shape[2] == 3
    meshes = [e.mesh for e in events if e.mesh is not None]
    assert meshes and len(meshes[0][1]) > 0


def test_glb_and_sidecar(tiny_run):
    _, result, _, out = tiny_run
    loaded = load_glb(out)
    assert len(loaded.faces) == len(result.faces) > 0
    assert loaded.texture is not None and loaded.texture.shape[:2] == (64, 64)
    extent = loaded.vertices.max(0) - loaded.vertices.min(0)
    assert abs(extent.max() - 1.0) < 1e-4  # unit bounding box
    assert np.abs(loaded.vertices.max(0) + loaded.vertices.min(0)).max() < 1e-4  # centred
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a red cube" and sidecar["seed"] == 3 and sidecar["model"] == "bundled"
    assert sidecar["guidance"] == "sds" and sidecar["preset"]["coarse_steps"] == 4
    assert {"coarse_s", "extract_s", "texture_s"} <= set(sidecar["timings_s"])


def test_same_seed_gives_the_same_mesh(tiny_run, tmp_path):
    _, first, _, _ = tiny_run
    again = TextTo3D(_request()).run(tmp_path / "again.glb")
    digest = lambda r: hashlib.sha256(r.vertices.tobytes() + r.faces.tobytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(first)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_run, tmp_path):
    first_pipe = tiny_run[0]
    ckpt = tmp_path / "ckpt"

    class Stop(Exception):
        pass

    def stop_at_2(event):
        if event.stage == "coarse" and event.step == 3:
            raise Stop()

    with pytest.raises(Stop):
        TextTo3D(_request(), progress=stop_at_2, checkpoint_dir=ckpt).run(tmp_path / "x.glb")
    resumed = TextTo3D(_request(), checkpoint_dir=ckpt)
    assert resumed.coarse_loop().resume(resumed) and resumed.step == 2
    resumed.coarse()
    for (name, a), b in zip(first_pipe.field.state_dict().items(), resumed.field.state_dict().values()):
        assert torch.equal(a, b), name


def test_cancel_stops_the_run(tmp_path):
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        TextTo3D(_request(), cancelled=cancelled).run(tmp_path / "c.glb")
    assert not (tmp_path / "c.glb").exists()


def test_unknown_prompt_fails_before_any_work():
    with pytest.raises(ValueError, match="cube"):  # the message lists the words the model knows
        TextTo3D(_request(prompt="a flying spaghetti monster"))


def test_otsu_separates_two_clusters():
    values = torch.cat([torch.randn(1000) * 0.1, 5 + torch.randn(300) * 0.1])
    assert 0.5 < otsu_threshold(values) < 4.5


def test_orientation_penalty_only_counts_normals_facing_away():
    d = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # two rays looking along +Y
    out = {"rays_d": d, "opacity": torch.tensor([1.0, 1.0]),
           "samples": {"ray_indices": torch.tensor([0, 1]), "weights": torch.tensor([0.5, 0.5]),
                       "normals": torch.tensor([[0.0, -1.0, 0.0], [0.0, -1.0, 0.0]])}}
    assert float(TextTo3D.orientation_penalty(out)) == 0.0  # both face the camera
    out["samples"]["normals"] = torch.tensor([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(TextTo3D.orientation_penalty(out)) == pytest.approx(0.25)  # 0.5 * 1^2 / 2 hit rays


def test_lit_steps_shade_with_the_priors_lights(tiny_run):
    pipe = tiny_run[0]
    assert pipe.prior.lighting["lights"]  # the bundled prior declares its training lights
    c2w, fovs = pipe.cameras.sample(1)
    with torch.no_grad():
        out = pipe.render_views(c2w, fovs, jitter=False, compute_normals=True)
        lit = pipe._shade(out, c2w, "lambertian")
    hit = out["opacity"].reshape(lit.shape[2:]) > 0.9
    bg_only = out["opacity"].reshape(lit.shape[2:]) < 1e-3
    assert hit.any() and bg_only.any()
    # Shading only darkens or keeps the surface (ambient + lights clamped at 1) and leaves the background.
    assert (lit[0][:, hit] <= out["image"][0][:, hit] + 1e-5).all()
    assert torch.allclose(lit[0][:, bg_only], out["image"][0][:, bg_only], atol=1e-3)
    assert not torch.allclose(lit[0][:, hit], out["image"][0][:, hit], atol=1e-3)


def test_progressive_resolution_renders_small_first_and_full_size_from_its_end(tmp_path):
    torch.set_num_threads(1)
    pipe = TextTo3D(TextTo3DRequest(prompt="a red cube", seed=1, overrides={
        **TINY, "coarse_steps": 6, "progressive_start": 16, "progressive_until": 0.5, "shading_mix": (1, 0, 0)}))
    sizes = []
    render = pipe.render_views

    def spy(*args, **kw):  # records the training renders' size (previews are always full size)
        out = render(*args, **kw)
        if kw.get("jitter"):
            sizes.append(out["image"].shape[-1])
        return out

    pipe.render_views = spy
    pipe.coarse()
    # Linear from 16 to the prior's 32 pixels over the first 3 of 6 steps, then full size.
    assert pipe.resolution == 32 and sizes == [16, 21, 27, 32, 32, 32], sizes
    with pytest.raises(ValueError, match="progressive_start"):
        TextTo3D(TextTo3DRequest(prompt="a red cube", overrides={**TINY, "progressive_start": 4}))


def test_bad_shading_mix_is_refused():
    with pytest.raises(ValueError, match="shading_mix"):
        TextTo3D(TextTo3DRequest(prompt="a red cube", overrides={**TINY, "shading_mix": (0.0, 0.0, 0.0)}))


def test_the_presets_blob_is_where_the_field_starts():
    centre, edge = torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 0.5]])
    bias = {b: TextTo3D(TextTo3DRequest(prompt="a red cube", overrides={**TINY, "blob_density": b})).field.blob_bias
            for b in (0.0, 3.0)}
    assert float(bias[3.0](centre) - bias[0.0](centre)) == pytest.approx(3.0)
    assert float(bias[3.0](edge) - bias[0.0](edge)) == pytest.approx(0.0, abs=1e-6)  # crosses zero at its radius
    with pytest.raises(ValueError, match="blob_density"):
        TextTo3D(TextTo3DRequest(prompt="a red cube", overrides={**TINY, "blob_density": -1.0}))


def test_refine_stage_runs_between_extract_and_export(tmp_path):
    """A preset with refine_steps > 0 refines the extracted mesh (DMTet + texture field) before export."""
    torch.set_num_threads(1)
    events = []
    request = TextTo3DRequest(prompt="a red cube", seed=3,
                              overrides={**TINY, "refine_steps": 2, "tet_resolution": 16})
    result = TextTo3D(request, progress=events.append, checkpoint_dir=tmp_path / "ckpt").run(tmp_path / "r.glb")
    stages = [e.stage for e in events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["coarse", "extract", "refine", "texture", "export"]
    assert [e.step for e in events if e.stage == "refine"] == [0, 1, 2]  # the begin event, then two steps
    assert (tmp_path / "ckpt" / "refine.pt").is_file()
    sidecar = json.loads((tmp_path / "r.json").read_text())
    assert "refine_s" in sidecar["timings_s"] and "texture_s" not in sidecar["timings_s"]
    loaded = load_glb(tmp_path / "r.glb")
    assert len(loaded.faces) == len(result.faces) > 0 and np.isfinite(loaded.vertices).all()
    assert abs((loaded.vertices.max(0) - loaded.vertices.min(0)).max() - 1.0) < 1e-4
    # the texture starts from the coarse field's albedo: still red after two refine steps
    texels = loaded.texture.reshape(-1, 3).astype(float)
    assert texels[:, 0].mean() > texels[:, 1].mean() and texels[:, 0].mean() > texels[:, 2].mean()


class _MembraneTorus(torch.nn.Module):
    """A yellow torus (major radius 0.5, minor 0.15, about Z) whose hole holds a thin disc of the prior's
    background colour: what the prior's "hole, showing background" leaves in a field (issue 23)."""

    def __init__(self, membrane_rgb) -> None:
        super().__init__()
        self.register_buffer("aabb", torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
        self.membrane_rgb = torch.tensor(membrane_rgb)

    def _parts(self, x):
        ring = torch.sqrt((x[:, :2].norm(dim=-1) - 0.5) ** 2 + x[:, 2] ** 2) - 0.15
        disc = torch.maximum(x[:, :2].norm(dim=-1) - 0.45, x[:, 2].abs() - 0.04)
        return ring, disc

    def density(self, x):
        ring, disc = self._parts(x)
        return 50.0 * torch.sigmoid(-torch.minimum(ring, disc) / 0.01)

    def forward(self, x, view_dirs=None):
        ring, disc = self._parts(x)
        yellow = torch.tensor([0.95, 0.85, 0.10]).expand(len(x), 3)
        albedo = torch.where((disc < ring)[:, None], self.membrane_rgb.expand(len(x), 3), yellow)
        return {"density": self.density(x), "albedo": albedo}


def test_background_coloured_matter_is_carved_at_extraction_and_penalised(tiny_run):
    from engine_server.pipelines.quality import genus

    pipe = tiny_run[0]
    bg = pipe.defaults.background_rgb
    assert pipe.carve_rgb == bg  # the bundled prior's cyan is no object's colour
    field, carve = pipe.field, pipe.carve_rgb
    try:
        pipe.field = _MembraneTorus(bg)
        assert genus(*pipe.extract()) == 1  # the membrane is left out: the hole is open
        pipe.carve_rgb = None
        assert genus(*pipe.extract()) == 0  # read as matter, it closes the hole
        pipe.carve_rgb = carve
        pipe.field = _MembraneTorus((0.12, 0.70, 0.16))  # a green disc is an object's part, and stays
        assert genus(*pipe.extract()) == 0

        # The penalty counts the membrane seen through the hole from above, and not the torus's body.
        pipe.field = _MembraneTorus(bg)
        down = torch.tensor([[0.0, 0.0, -1.0]])

        def penalty(x, y):
            out = pipe.renderer.render(pipe.field, torch.tensor([[x, y, 2.0]]), down, pipe.background)
            return float(pipe.background_matter(out)), float(out["opacity"][0])
        through_hole, opacity = penalty(0.0, 0.0)
        assert opacity > 0.9 and through_hole == pytest.approx(opacity, rel=1e-3)
        assert penalty(0.5, 0.0)[0] < 1e-3
    finally:
        pipe.field, pipe.carve_rgb = field, carve


def test_bad_background_matter_weight_is_refused():
    with pytest.raises(ValueError, match="background_matter_weight"):
        TextTo3D(TextTo3DRequest(prompt="a red cube", overrides={**TINY, "background_matter_weight": -1.0}))
