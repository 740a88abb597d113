"""The engine's matrix product (evalsuite.engine.linear): the float32 route for BF16 on CPUs
without BF16 arithmetic, its batch invariance, and its cached float32 weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evalsuite.engine import linear as lin

SHAPES = [(1536, 576), (576, 1536), (960, 576), (8192, 576), (160, 64), (64, 160)]  # SmolLM2-like and tiny-model shapes


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
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 40)
    exact = x.double() @ w.double().T + b.double()
    ulp = exact.abs().bfloat16().double() * 2.0 ** -7
    assert ((got.double() - exact).abs() <= ulp + 1e-30).all()


@pytest.mark.parametrize("native", [True, False])
def test_batched_bf16_matmul_is_the_rounded_exact_product(monkeypatch, native):
    """``matmul`` (the explicit attention path's two products), either route: the float64
    product of the BF16 operands rounded once to BF16, up to one BF16 ulp."""
    monkeypatch.setattr(lin, "cpu_has_native_bf16", lambda: native)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(2, 3, 24, 64, generator=g).bfloat16()
    b = torch.randn(2, 3, 64, 40, generator=g).bfloat16()
    got = lin.matmul(a, b)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 24, 40)
    exact = a.double() @ b.double()
    ulp = exact.abs().bfloat16().double() * 2.0 ** -7
    assert ((got.double() - exact).abs() <= ulp + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out,inp", SHAPES)
def test_rows_do_not_depend_on_how_many_share_the_call(monkeypatch, dtype, out, inp):
    """Batch invariance, bit for bit: every row of a call of M rows equals the same row of one
    600-row call, for every M from 1 to 40 and a few larger ones."""
    monkeypatch.setattr(lin, "cpu_has_native_bf16", lambda: False)
    g = torch.Generator().manual_seed(out + inp)
    x = torch.randn(600, inp, generator=g).to(dtype)
    w = torch.randn(out, inp, generator=g).to(dtype) * inp ** -0.5
    b = torch.randn(out, generator=g).to(dtype)
    ref, ref_b = lin.linear(x, w), lin.linear(x, w, b)
    for m in list(range(1, 41)) + [63, 128, 129, 513]:
        assert torch.equal(lin.linear(x[:m], w), ref[:m]), f"{m} rows"
        assert torch.equal(lin.linear(x[:m], w, b), ref_b[:m]), f"{m} rows, with a bias"


@pytest.mark.parametrize("out,inp", SHAPES)
def test_float32_route_is_torchs_float32_product(monkeypatch, out, inp):
    """The transposed product (12-128 rows) gives the very bits of ``F.linear`` in float32, bias
    included, and the BF16 route is that product rounded once."""
    monkeypatch.setattr(lin, "cpu_has_native_bf16", lambda: False)
    g = torch.Generator().manual_seed(out * inp)
    x = torch.randn(300, inp, generator=g)
    w = torch.randn(out, inp, generator=g) * inp ** -0.5
    b = torch.randn(out, generator=g)
    for m in (12, 13, 64, 128, 300):
        assert torch.equal(lin.linear(x[:m], w), F.linear(x[:m], w)), f"{m} rows"
        assert torch.equal(lin.linear(x[:m], w, b), F.linear(x[:m], w, b)), f"{m} rows, with a bias"
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(lin.linear(xb, wb), F.linear(xb.float(), wb.float()).bfloat16())


def test_float32_copy_follows_in_place_changes(monkeypatch):
    monkeypatch.setattr(lin, "cpu_has_native_bf16", lambda: False)
    w = torch.randn(8, 16).bfloat16()
    x = torch.randn(5, 16).bfloat16()
    first = lin.linear(x, w)
    assert lin.float32_copy(w) is lin.float32_copy(w)  # kept, not made per call
    with torch.no_grad():
        w.mul_(2)
    assert torch.equal(lin.linear(x, w), (first.float() * 2).bfloat16())


def test_small_decode_steps_take_the_native_kernel(monkeypatch):
    monkeypatch.setattr(lin, "cpu_has_native_bf16", lambda: False)
    x, w = torch.randn(2, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    with lin.decode_kernels(2):
        assert torch.equal(lin.linear(x, w), F.linear(x, w))
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled


def test_float32_and_hooked_modules(monkeypatch):
    monkeypatch.setattr(lin, "cpu_has_native_bf16", lambda: False)
    m = torch.nn.Linear(16, 4)
    x = torch.randn(8, 16)
    assert torch.allclose(lin.project(m, x), F.linear(x, m.weight, m.bias), atol=1e-6)
    seen = []
    mb = torch.nn.Linear(16, 4).bfloat16()
    mb.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    lin.project(mb, x.bfloat16())
    assert len(seen) == 1  # a hooked linear is called as a module, so its hooks run
