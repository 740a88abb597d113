"""The engine's BF16 product route for CPUs without BF16 arithmetic (evalsuite.engine.linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evalsuite.engine import linear as lin


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 33])
def test_bf16_product_is_the_rounded_exact_sum(monkeypatch, native, rows):
    """Either route returns the float64 product of the BF16 operands rounded once to BF16, up to
    one BF16 ulp (where the float32 sum's own rounding lands next to a BF16 midpoint)."""
    monkeypatch.setattr(lin, "cpu_has_native_bf16", lambda: native)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).bfloat16()
    w = torch.randn(40, 96, generator=g).bfloat16()
    b = torch.randn(40, generator=g).bfloat16()
    got = lin.linear(x, w, b)
    assert got.dtype == torch.bfloat16
    exact = (x.double() @ w.double().T + b.double())
    ulp = exact.abs().bfloat16().double() * 2.0 ** -7
    assert ((got.double() - exact).abs() <= ulp + 1e-30).all()
    assert ((got.double() - exact.bfloat16().double()).abs() <= ulp).all()


def test_float32_and_hooked_modules_take_the_plain_path(monkeypatch):
    monkeypatch.setattr(lin, "cpu_has_native_bf16", lambda: False)
    x = torch.randn(8, 16)
    m = torch.nn.Linear(16, 4)
    assert torch.equal(lin.project(m, x), F.linear(x, m.weight, m.bias))
    seen = []
    mb = torch.nn.Linear(16, 4).bfloat16()
    mb.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    lin.project(mb, x.bfloat16())
    assert len(seen) == 1  # a hooked linear is called as a module, so its hooks run
