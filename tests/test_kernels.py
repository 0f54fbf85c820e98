import pytest
import torch
import torch.nn.functional as F

from llmclock.engine import kernels as K
from conftest import kernel_or_fallback

SHAPES = [(96, 1000), (768, 2304), (33, 7), (3072, 768), (5, 64)]


def _ref(x, w, b, gelu=False):
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if gelu else y


@pytest.fixture(params=[False, True], ids=["kernel", "fallback"])
def mode(request, monkeypatch):
    return kernel_or_fallback(request, monkeypatch, K)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 13, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear(mode, k, n, m, bias):
    torch.manual_seed(k * n + m)
    w, x = torch.randn(n, k) / k**0.5, torch.randn(m, k)  # unit-scale outputs
    b = torch.randn(n) if bias else None
    torch.testing.assert_close(K.make_linear(w, b)(x), _ref(x, w, b), atol=1e-4, rtol=1e-4)


def test_fused_gelu_residual_and_batch_dims(mode):
    w, b, x = torch.randn(100, 96), torch.randn(100), torch.randn(2, 4, 96)
    f = K.make_linear(w, b)
    torch.testing.assert_close(f(x, gelu=True), _ref(x, w, b, True), atol=1e-4, rtol=1e-4)
    h = torch.randn(2, 4, 100)
    expect = h + _ref(x, w, b)
    assert f(x, out=h, accumulate=True) is h
    torch.testing.assert_close(h, expect, atol=1e-4, rtol=1e-4)


def test_noncontiguous_input(mode):
    w, b = torch.randn(50, 40), torch.randn(50)
    x = torch.randn(40, 8).t()  # (8, 40), stride (1, 8)
    torch.testing.assert_close(K.make_linear(w, b)(x), _ref(x, w, b), atol=1e-4, rtol=1e-4)


def test_bf16_falls_back_to_torch():
    w, b, x = (t.to(torch.bfloat16) for t in (torch.randn(24, 16), torch.randn(24), torch.randn(3, 16)))
    f = K.make_linear(w, b)
    assert f.packed is None
    torch.testing.assert_close(f(x), F.linear(x, w, b))


def test_build_failure_falls_back(monkeypatch):
    monkeypatch.setattr(K._kernels, "lib", None)
    monkeypatch.setenv("CXX", "definitely-not-a-compiler")  # the real builder, with no compiler
    assert K.get_lib() is None
    w, x = torch.randn(10, 6), torch.randn(2, 6)
    torch.testing.assert_close(K.make_linear(w)(x), F.linear(x, w))


def test_measure_bandwidth_positive():
    assert K.measure_bandwidth(nbytes=1 << 22, repeats=2) > 1e8


def test_make_linear_fused_gelu_and_residual():
    w, b, x = torch.randn(70, 33), torch.randn(70), torch.randn(3, 33)
    f = K.make_linear(w, b)
    torch.testing.assert_close(f(x), _ref(x, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f(x, gelu=True), F.gelu(_ref(x, w, b), approximate="tanh"), atol=1e-4, rtol=1e-4)
    h = torch.randn(3, 70)
    expect = h + _ref(x, w, b)
    f(x, out=h, accumulate=True)
    torch.testing.assert_close(h, expect, atol=1e-4, rtol=1e-4)


def test_decode_attention_matches_sdpa_with_rows_at_different_positions():
    if K.get_lib() is None:
        pytest.skip("no compiled kernels here")
    torch.manual_seed(0)
    slots, nh, max_len, hs = 3, 3, 40, 16
    C = nh * hs
    kc, vc = torch.randn(slots, nh, max_len, hs), torch.randn(slots, nh, max_len, hs)
    pos = torch.tensor([0, 17, 39])
    qkv = torch.randn(slots, 3 * C)
    ref_k, ref_v = kc.clone(), vc.clone()
    q, k, v = qkv.view(slots, 3, nh, hs).unbind(1)
    expect = []
    for b in range(slots):
        ref_k[b, :, pos[b]], ref_v[b, :, pos[b]] = k[b], v[b]
        L = int(pos[b]) + 1
        expect.append(F.scaled_dot_product_attention(q[b, :, None], ref_k[b, :, :L], ref_v[b, :, :L]).reshape(C))
    y = K.make_attend(kc)(qkv, kc, vc, pos)
    torch.testing.assert_close(y, torch.stack(expect), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kc, ref_k)  # each row's key/value written at its own position
    torch.testing.assert_close(vc, ref_v)
    assert K.make_attend(kc.to(torch.bfloat16)) is None  # other dtypes use index writes + SDPA


def test_exact_gelu_activation(mode):
    w, b, x = torch.randn(40, 24), torch.randn(40), torch.randn(5, 24)
    f = K.make_linear(w, b, approximate="none")
    torch.testing.assert_close(f(x, gelu=True), F.gelu(F.linear(x, w, b)), atol=1e-4, rtol=1e-4)
