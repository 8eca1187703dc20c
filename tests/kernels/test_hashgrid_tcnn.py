"""The `tcnn` hash-grid backend (tiny-cuda-nn). It keeps its own parameter layout and numerics
(see kernels/hashgrid/tcnn_backend.py), so it is compared with the reference where the two
must agree exactly: a grid of constant features interpolates to that constant everywhere."""
from __future__ import annotations

import math

import pytest
import torch

from kernels.hashgrid import HashGridConfig, HashGridEncoder, hash_encode_torch
from kernels.hashgrid.tcnn_backend import tcnn_encoding_config

CONFIG = HashGridConfig(n_levels=4, n_features=2, log2_table_size=12, base_resolution=4, max_resolution=64)


def test_tcnn_config_mirrors_ours():
    cfg = tcnn_encoding_config(CONFIG)
    assert cfg["otype"] == "HashGrid" and cfg["n_levels"] == 4 and cfg["n_features_per_level"] == 2
    assert cfg["log2_hashmap_size"] == 12 and cfg["base_resolution"] == 4
    assert math.isclose(cfg["base_resolution"] * cfg["per_level_scale"] ** 3, 64)
    with pytest.raises(ValueError, match="n_features in 1, 2, 4, 8"):
        tcnn_encoding_config(HashGridConfig(n_features=3))


@pytest.mark.cuda
def test_tcnn_constant_grid_matches_reference_and_has_gradients():
    pytest.importorskip("tinycudann")
    enc = HashGridEncoder(CONFIG, backend="tcnn")
    assert enc.table is None and enc.backend_for(torch.device("cuda")) == "tcnn"
    with torch.no_grad():
        enc.tcnn.encoding.params.fill_(0.25)
    x = torch.cat([torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-0.5, 0.5, 2.0]]), torch.rand(500, 3)]).cuda()
    x.requires_grad_(True)
    out = enc(x)
    table = torch.full((CONFIG.n_levels, CONFIG.table_size, CONFIG.n_features), 0.25, device="cuda")
    torch.testing.assert_close(out.float(), hash_encode_torch(x.detach(), table, CONFIG), rtol=1e-3, atol=1e-3)
    out.float().square().sum().backward()
    assert enc.tcnn.encoding.params.grad is not None and enc.tcnn.encoding.params.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
