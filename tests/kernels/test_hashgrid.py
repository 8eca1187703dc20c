"""Hash-grid encoding: the reference (spec) and every backend against it, backend selection and errors."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.hashgrid import BackendUnavailableError, HashGridConfig, HashGridEncoder, backend_status, hash_encode_torch
from kernels.hashgrid import backends as hg_backends
from kernels.hashgrid import cpu as hg_cpu
from kernels.hashgrid.config import PRIMES
from kernels.hashgrid.reference import corner_indices

REPO = Path(__file__).resolve().parents[2]

# Two dense levels ((R+1)^3 <= 2^9 for R = 3, 7) and two hashed ones (R = 14, 29).
MIXED = HashGridConfig(n_levels=4, n_features=2, log2_table_size=9, base_resolution=3, max_resolution=29)
TINY = HashGridConfig(n_levels=3, n_features=2, log2_table_size=6, base_resolution=2, max_resolution=8)


def _points(n: int, dtype=torch.float32) -> torch.Tensor:
    """Random points in [0,1]^3 plus exact box boundaries, cell faces and points outside (clamped)."""
    x = torch.rand(n, 3, dtype=dtype)
    special = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [0, 1, 0.5], [1, 0, 0.25], [0.5, 0.5, 0.5], [1 / 3, 2 / 3, 1],
         [-0.2, 0.3, 1.4], [1.5, -1.0, 0.7], [0.0, 1.0, -0.0], [2.0, 2.0, -3.0]],
        dtype=dtype,
    )  # fmt: skip
    return torch.cat([special, x])


def _table(config: HashGridConfig, dtype=torch.float32) -> torch.Tensor:
    # Unit-scale values so that differences in indexing or weights show clearly.
    return torch.randn(config.n_levels, config.table_size, config.n_features).to(dtype)


def _grads(encode, x, table, config, grad_out):
    x = x.detach().clone().requires_grad_(True)
    table = table.detach().clone().requires_grad_(True)
    out = encode(x, table, config)
    gx, gt = torch.autograd.grad(out, (x, table), grad_out.to(out.dtype))
    return out.detach(), gx, gt


def assert_matches_reference(encode, config, x, table, table_grad_rtol=1e-5):
    grad_out = torch.randn(x.shape[0], config.output_dim)
    ref_out, ref_gx, ref_gt = _grads(hash_encode_torch, x, table.float(), config, grad_out)
    out, gx, gt = _grads(encode, x, table, config, grad_out)
    assert out.shape == (x.shape[0], config.output_dim) and out.dtype == x.dtype
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    # Input gradients scale with the resolution (d frac / dx = R): compare relative to their size.
    scale = ref_gx.abs().max().item()
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5 * scale)
    assert gt.dtype == table.dtype
    # Table gradients are float32 sums of many terms; threads add them in another order than the
    # reference, so allow the rounding of a float32 sum (~1e-4 relative), not only of one term.
    torch.testing.assert_close(gt.float(), ref_gt.to(table.dtype).float(), rtol=max(table_grad_rtol, 1e-4),
                               atol=1e-4)
    # Clamped coordinates outside [0, 1] get no gradient; boundaries do (torch.clamp semantics).
    outside = (x < 0) | (x > 1)
    assert torch.all(gx[outside] == 0)
    assert gx[:2].abs().sum() > 0


# -- the reference (the specification) --------------------------------------------------------


def test_config_levels_grow_geometrically_and_dense_levels_fit():
    c = HashGridConfig()
    assert c.resolutions[0] == 16 and c.resolutions[-1] == 2048
    assert all(b > a for a, b in zip(c.resolutions, c.resolutions[1:]))
    assert c.dense_levels == tuple((r + 1) ** 3 <= 2**19 for r in c.resolutions)
    assert MIXED.dense_levels == (True, True, False, False)


def test_reference_gradcheck_float64():
    x = (torch.rand(12, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    table = torch.randn(TINY.n_levels, TINY.table_size, TINY.n_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: hash_encode_torch(a, b, TINY), (x, table))


def test_reference_interpolates_linear_functions_exactly_on_dense_levels():
    # A table holding a linear function of the vertex coordinates is reproduced exactly by
    # trilinear interpolation: checks the dense indexing, the cell choice and the weights.
    c = HashGridConfig(n_levels=2, n_features=1, log2_table_size=12, base_resolution=4, max_resolution=9)
    assert all(c.dense_levels)
    coeff = torch.tensor([0.3, -1.1, 2.0], dtype=torch.float64)
    table = torch.zeros(c.n_levels, c.table_size, 1, dtype=torch.float64)
    for level, r in enumerate(c.resolutions):
        side = r + 1
        i = torch.arange(side**3)
        vertex = torch.stack([i % side, (i // side) % side, i // (side * side)], -1).double() / r
        table[level, : side**3, 0] = vertex @ coeff
    x = _points(50, torch.float64)
    out = hash_encode_torch(x, table, c)
    expected = (x.clamp(0, 1) @ coeff)[:, None].expand(-1, 2)
    torch.testing.assert_close(out, expected)


def test_reference_hash_uses_the_primes_modulo_table_size():
    cell = torch.tensor([[5, 17, 1023], [0, 0, 0], [2047, 2046, 2045]])
    rows = corner_indices(cell, 2048, dense=False, table_size=2**19)
    for n, (cx, cy, cz) in enumerate(cell.tolist()):
        for corner in range(8):
            ix, iy, iz = cx + (corner & 1), cy + (corner >> 1 & 1), cz + (corner >> 2 & 1)
            h = ((ix * PRIMES[0]) ^ (iy * PRIMES[1]) ^ (iz * PRIMES[2])) & 0xFFFFFFFF
            assert rows[n, corner].item() == h % 2**19


# -- the C++/OpenMP backend ---------------------------------------------------------------------

cpu_available = pytest.mark.skipif(
    not hg_cpu.probe().available, reason=f"cpu backend: {hg_cpu.probe().reason}"
)


@cpu_available
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_backend_matches_reference_float32(threads):
    encode = hg_cpu.load()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    n = 20000  # enough work per thread that the kernel uses all of them
    assert hg_cpu._threads(n, HashGridConfig(n_levels=1)) == threads
    try:
        assert_matches_reference(encode, MIXED, _points(n), _table(MIXED))
        # One level, two threads: the level is split between them and scattered atomically.
        one = HashGridConfig(n_levels=1, n_features=3, log2_table_size=10, base_resolution=40, max_resolution=40)
        assert_matches_reference(encode, one, _points(n), _table(one))
    finally:
        torch.set_num_threads(before)


@cpu_available
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_backend_half_precision_tables(dtype):
    # Half tables are read exactly and interpolated in float32: the reference on the upcast
    # table is the target; the table gradient comes back in the table's dtype.
    assert_matches_reference(hg_cpu.load(), MIXED, _points(2000), _table(MIXED, dtype), table_grad_rtol=1e-2)


@cpu_available
def test_cpu_backend_gradcheck_float64():
    encode = hg_cpu.load()
    x = (torch.rand(12, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    table = torch.randn(TINY.n_levels, TINY.table_size, TINY.n_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: encode(a, b, TINY), (x, table))


@cpu_available
def test_cpu_backend_double_backward_matches_reference():
    # A loss on autograd normals (d features / dx with create_graph) differentiated w.r.t. the table.
    encode = hg_cpu.load()
    x = torch.rand(64, 3)
    table = _table(MIXED).requires_grad_(True)

    def normal_loss(fn):
        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(fn(xr, table, MIXED).sum(), xr, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), table)[0]

    torch.testing.assert_close(normal_loss(encode), normal_loss(hash_encode_torch), rtol=1e-4, atol=1e-4)


@cpu_available
def test_cpu_backend_rejects_bad_inputs():
    encode = hg_cpu.load()
    with pytest.raises(ValueError, match=r"table must be \(4, 512, 2\)"):
        encode(torch.rand(5, 3), torch.zeros(4, 256, 2), MIXED)
    with pytest.raises(ValueError, match=r"must be \(N, 3\)"):
        encode(torch.rand(5, 2), _table(MIXED), MIXED)
    out = encode(torch.rand(0, 3), _table(MIXED), MIXED)
    assert out.shape == (0, MIXED.output_dim)
    # A NaN coordinate gives NaN features, as in the reference, and stays in bounds.
    x = torch.tensor([[float("nan"), 0.5, 0.5], [0.2, 0.3, 0.4]])
    table = _table(MIXED)
    out, ref = encode(x, table, MIXED), hash_encode_torch(x, table, MIXED)
    assert torch.isnan(out[0]).all() and torch.isnan(ref[0]).all()
    torch.testing.assert_close(out[1], ref[1])


def test_cpu_probe_is_cheap_and_build_failure_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(hg_cpu, "_lib", None)
    monkeypatch.setattr(hg_cpu, "_load_error", None)
    status = hg_cpu.probe()
    assert not any(tmp_path.iterdir())  # probing built nothing
    if status.available:
        assert "built on first use" in status.reason
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setattr(hg_backends.REGISTRY, "_loaded", {})
    with pytest.raises(BackendUnavailableError, match="building the C\\+\\+ kernel .* failed"):
        hg_cpu.load()
    assert not hg_cpu.probe().available
    # `auto` falls back to the reference when the fast path cannot be built; a name does not.
    name, encode = hg_backends.resolve_and_load("auto", torch.device("cpu"))
    assert name == "torch" and encode is hash_encode_torch
    with pytest.raises(BackendUnavailableError, match="'cpu' is unavailable"):
        hg_backends.resolve_and_load("cpu", torch.device("cpu"))


@cpu_available
def test_cpu_kernel_is_built_once_then_loaded_without_cpp_extension(tmp_path):
    from torch.utils.cpp_extension import get_default_build_root

    assert hg_cpu.default_build_root() == get_default_build_root()  # where torch itself would put it
    load = ("import sys, torch; from kernels.hashgrid import cpu; cpu.load(); "
            "print('cpp_extension' if 'torch.utils.cpp_extension' in sys.modules else 'direct')")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parents[2]) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert [r.stdout.split()[-1] for r in runs] == ["cpp_extension", "direct"]  # the second start skips the build
    assert (tmp_path / hg_cpu.extension_name() / f"{hg_cpu.extension_name()}.so").is_file()


# -- selection, module, errors ------------------------------------------------------------------


def test_backend_status_names_every_backend_with_a_reason():
    status = backend_status()
    assert {"torch", "cpu", "triton", "tcnn"} <= set(status)
    assert status["torch"].available
    for st in status.values():
        assert st.reason


def test_unavailable_or_unknown_backend_raises_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="unknown hash-grid backend 'nope'.*torch"):
        hg_backends.resolve("nope", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="'triton'"):
            HashGridEncoder(MIXED, backend="triton")(torch.rand(4, 3))
    if importlib.util.find_spec("tinycudann") is None or not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="'tcnn' is unavailable"):
            HashGridEncoder(MIXED, backend="tcnn")
    with pytest.raises(BackendUnavailableError, match="runs on cpu, not on cuda"):
        hg_backends.resolve("cpu", torch.device("cuda"))


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
def test_encoder_module_trains_its_table(backend):
    if backend == "cpu" and not hg_cpu.probe().available:
        pytest.skip(hg_cpu.probe().reason)
    enc = HashGridEncoder(MIXED, backend=backend)
    x = _points(500)
    out = enc(x)
    assert out.shape == (x.shape[0], MIXED.output_dim)
    expected = "cpu" if backend == "auto" and hg_cpu.probe().available else ("torch" if backend == "auto" else backend)
    assert enc.backend_for(x.device) == expected
    out.square().sum().backward()
    assert enc.table.grad is not None and enc.table.grad.shape == enc.table.shape
    torch.testing.assert_close(out, hash_encode_torch(x, enc.table.detach(), MIXED), rtol=1e-5, atol=1e-6)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_import_kernels_without_cuda_imports_no_optional_backend():
    code = (
        "import sys, kernels, kernels.hashgrid as hg\n"
        "st = hg.backend_status()\n"
        "assert not st['tcnn'].available and 'triton' not in sys.modules and 'tinycudann' not in sys.modules\n"
        "print(sorted(st))\n"
    )
    proc = _run_python(code, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr
    assert "'cpu', 'tcnn', 'torch', 'triton'" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_in_the_interpreter():
    """Runs test_hashgrid_triton.py in a process with TRITON_INTERPRET=1 (it must be set before
    triton is imported, and must not leak into this process's other tests)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_hashgrid_triton.py"],
        cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
