"""Linear layers with prepacked weights (core/linear.py) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expertmesh.core.linear import Linear


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 7, 33, 130])
def test_packed_linear_matches_f_linear(dtype, tolerance, rows):
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(384, 96, generator=gen) / 96 ** 0.5).to(dtype)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    layer = Linear(weight)
    if torch.backends.mkldnn.is_available():
        assert layer.weight is None, "on the CPU the packed copy replaces the weight"
    got, expected = layer(x), F.linear(x, weight)
    assert got.shape == (rows, 384) and got.dtype == dtype
    if rows:
        scale = expected.float().abs().max().item()
        assert (got.float() - expected.float()).abs().max().item() <= tolerance * max(scale, 1.0)
    assert layer.nbytes == weight.numel() * weight.element_size()


def test_a_dtype_onednn_lacks_keeps_the_weight():
    weight = torch.randn(16, 8, dtype=torch.float16)
    layer = Linear(weight)
    assert layer.weight is weight
    x = torch.randn(3, 8, dtype=torch.float16)
    assert torch.equal(layer(x), F.linear(x, weight))
