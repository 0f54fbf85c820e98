import warnings

import pytest
import torch
import torch.nn.functional as F

from llmclock.engine import kernels as K
from conftest import kernel_or_fallback, requires_kernels

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


def test_missing_library_warns_once_and_falls_back(monkeypatch, tmp_path):
    from llmclock import cbuild

    monkeypatch.setattr(cbuild, "DIR", tmp_path)  # the real loader, looking where nothing was built
    monkeypatch.setattr(cbuild, "_loaded", None)
    monkeypatch.setattr(K._kernels, "lib", None)
    monkeypatch.delenv("LLMCLOCK_REQUIRE_KERNELS", raising=False)
    with pytest.warns(RuntimeWarning, match="no compiled kernels in .*make setup"):
        assert K.get_lib() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert cbuild.shared() is None
    w, x = torch.randn(10, 6), torch.randn(2, 6)
    f = K.make_linear(w)
    assert f.packed is None
    torch.testing.assert_close(f(x), F.linear(x, w))


def test_required_kernels_missing_is_an_error(monkeypatch, tmp_path):
    from llmclock import cbuild
    from llmclock.errors import LLMClockError

    monkeypatch.setattr(cbuild, "DIR", tmp_path)
    monkeypatch.setattr(cbuild, "_loaded", None)
    monkeypatch.setenv("LLMCLOCK_REQUIRE_KERNELS", "1")
    with pytest.raises(LLMClockError, match="LLMCLOCK_REQUIRE_KERNELS=1.*no compiled kernels"):
        cbuild.shared()
    (tmp_path / "_kernels_base.so").write_bytes(b"not a library")  # a broken build fails too
    monkeypatch.setattr(cbuild, "_loaded", None)
    with pytest.raises(LLMClockError, match="do not load"):
        cbuild.shared()


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


@pytest.mark.parametrize("slots,nh,max_len,hs,last", [(3, 3, 40, 16, 39), (2, 4, 300, 64, 260), (3, 2, 50, 12, 45)])
def test_decode_attention_matches_sdpa_with_rows_at_different_positions(slots, nh, max_len, hs, last):
    """The second shape is past the kernel's one-thread limit (its work is split over 2 threads); the
    third's head size (12) is no multiple of any vector width, so it runs the plain loops."""
    requires_kernels(K)
    torch.manual_seed(0)
    C = nh * hs
    kc, vc = torch.randn(slots, nh, max_len, hs), torch.randn(slots, nh, max_len, hs)
    pos = torch.tensor([0, 17, last][-slots:])
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


class _HistoryCache:
    """The model's cache interface for one row at one position: keys/values written at `pos` of a
    copy of the row's cache, the row's history 0..pos returned (what Block.forward attends over)."""

    def __init__(self, kc, vc, b, pos):
        self.kc, self.vc, self.b, self.pos = kc, vc, b, pos

    def update(self, k, v):  # (1, nh, 1, hs) each
        self.kc[self.b, :, self.pos], self.vc[self.b, :, self.pos] = k[0, :, 0], v[0, :, 0]
        return self.kc[self.b : self.b + 1, :, : self.pos + 1], self.vc[self.b : self.b + 1, :, : self.pos + 1]


def _decode_block(C, n_head, activation, bias=True):
    from llmclock.config import ModelConfig
    from llmclock.model import Block

    torch.manual_seed(C)
    block = Block(ModelConfig(vocab_size=50, block_size=64, n_layer=2, n_head=n_head, n_embd=C, bias=bias,
                              activation=activation)).eval()
    with torch.no_grad():
        for p in block.parameters():  # away from the identity init, so every term shows
            p.add_(torch.randn_like(p) * 0.1)
    return block


def _block_kernel(block):
    approx = block.mlp.approximate
    fs = [K.decode_linear(m, approximate=approx) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                         block.mlp.c_proj)]
    return K.make_block(block, *fs, approximate=approx)


@pytest.mark.parametrize("activation,bias", [("gelu_tanh", True), ("gelu", False)])
@pytest.mark.parametrize("C,n_head,pos,slots", [(64, 2, [5], None), (96, 3, [0, 33, 7, 63], [2, 0, 3, 1]),
                                                (256, 4, [200, 255], None)])
def test_decode_block_kernel_equals_block_forward(activation, bias, C, n_head, pos, slots):
    """One kernel call per block and decode step == Block.forward on each row with its own cached
    history, in its own cache slot (the last shape is past the attention's one-thread limit)."""
    requires_kernels(K)
    block = _decode_block(C, n_head, activation, bias)
    n, hs, max_len = len(pos), C // n_head, 256
    f = _block_kernel(block)
    assert f is not None
    g = torch.Generator().manual_seed(n)
    kc, vc = torch.randn(n, n_head, max_len, hs, generator=g), torch.randn(n, n_head, max_len, hs, generator=g)
    x = torch.randn(n, C, generator=g)
    ref_k, ref_v = kc.clone(), vc.clone()
    slot = slots or list(range(n))
    with torch.no_grad():
        expect = torch.cat([block(x[b : b + 1, None], _HistoryCache(ref_k, ref_v, slot[b], p))[:, 0]
                            for b, p in enumerate(pos)])
    y = x.clone()
    f(y, kc, vc, torch.tensor(pos), None if slots is None else torch.tensor(slots))
    torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kc, ref_k)
    torch.testing.assert_close(vc, ref_v)


@pytest.mark.parametrize("schemes", [("int4", "int8", "bf16", None), ("int4",) * 4, (None, None, "int8", "int4")])
@pytest.mark.parametrize("width", [256, 160])
def test_decode_block_kernel_runs_quantized_and_pruned_blocks(schemes, width):
    """A block whose Linears are quantized (each its own scheme, fp32 beside them) and whose MLP is
    narrower than 4C (structured pruning) still decodes in one kernel call, equal to Block.forward."""
    requires_kernels(K)
    from llmclock.compress.prune import prune_mlp
    from llmclock.compress.quant import QuantLinear

    C, n_head, pos = 64, 2, [9, 30]
    block = _decode_block(C, n_head, "gelu_tanh")
    if width != 4 * C:
        model = torch.nn.Module()
        model.transformer = torch.nn.Module()
        model.transformer.h = torch.nn.ModuleList([block])
        prune_mlp(model, 1 - width / (4 * C), [torch.arange(4 * C, dtype=torch.float32)])
    for name, scheme in zip(("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), schemes):
        if scheme is not None:
            parent, attr = name.split(".")
            lin = getattr(getattr(block, parent), attr)
            setattr(getattr(block, parent), attr, QuantLinear.from_linear(lin.weight, lin.bias, scheme, 32))
    assert block.mlp.c_fc.out_features == width
    f = _block_kernel(block)
    assert f is not None
    n, hs, max_len = len(pos), C // n_head, 64
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(n, n_head, max_len, hs, generator=g), torch.randn(n, n_head, max_len, hs, generator=g)
    x = torch.randn(n, C, generator=g)
    ref_k, ref_v = kc.clone(), vc.clone()
    with torch.no_grad():
        expect = torch.cat([block(x[b : b + 1, None], _HistoryCache(ref_k, ref_v, b, p))[:, 0] for b, p in enumerate(pos)])
    y = x.clone()
    f(y, kc, vc, torch.tensor(pos))
    torch.testing.assert_close(y, expect, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(kc, ref_k, atol=1e-5, rtol=1e-5)


def test_block_kernel_declines_blocks_with_adapters(mode):
    """A Linear wrapped by an adapter (a subclass standing in for peft's LoRA) is not read as plain
    weights: no whole-block kernel, and its decode linear runs the adapter."""
    block = _decode_block(64, 2, "gelu_tanh")
    assert (_block_kernel(block) is not None) == (not mode)

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    fc = block.mlp.c_fc
    block.mlp.c_fc = Doubled(fc.in_features, fc.out_features)
    block.mlp.c_fc.load_state_dict(fc.state_dict())
    assert _block_kernel(block) is None
    x = torch.randn(3, 64)
    torch.testing.assert_close(K.decode_linear(block.mlp.c_fc)(x), 2 * F.linear(x, fc.weight, fc.bias))
