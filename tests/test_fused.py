import copy

import pytest
import torch
import torch.nn.functional as F

from llmclock import fused
from llmclock.config import ModelConfig
from llmclock.model import GPT, Block
from conftest import kernel_or_fallback, requires_kernels


@pytest.fixture(params=[False, True], ids=["kernel", "fallback"])
def mode(request, monkeypatch):
    return kernel_or_fallback(request, monkeypatch, fused)


def _grads(f, *inputs, seed=0):
    """f(*inputs), and the gradients of a fixed random projection of it w.r.t. the inputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = f(*inputs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    y.backward(g)
    return y.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("n", [1, 15, 16, 1000, 70_001])
def test_gelu_matches_torch(mode, approximate, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4
    x[0] = -30.0  # far tails: exp underflow and saturation
    y, (gx,) = _grads(lambda t: fused.gelu(t, approximate=approximate), x)
    y_ref, (gx_ref,) = _grads(lambda t: F.gelu(t, approximate=approximate), x)
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)  # torch's own tanh-form gradient rounds to 1 early


def _sdpa(qkv, n_head):
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_head, C3 // 3 // n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C3 // 3)


@pytest.mark.parametrize("B,T,nh,hs", [(2, 64, 4, 32), (1, 1, 2, 16), (3, 37, 3, 64), (1, 130, 1, 48), (2, 9, 2, 5), (1, 45, 2, 128)])
def test_causal_attention_matches_sdpa(mode, B, T, nh, hs):
    qkv = torch.randn(B, T, 3 * nh * hs, generator=torch.Generator().manual_seed(T))
    y, (g,) = _grads(lambda t: fused.causal_attention(t, nh), qkv)
    y_ref, (g_ref,) = _grads(lambda t: _sdpa(t, nh), qkv)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_causal_attention_is_causal():
    requires_kernels(fused)
    qkv = torch.randn(1, 20, 3 * 32)
    later = qkv.clone()
    later[:, 12:] = torch.randn(1, 8, 96)  # changing later tokens
    torch.testing.assert_close(fused.causal_attention(qkv, 2)[:, :12], fused.causal_attention(later, 2)[:, :12])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("C,rows", [(16, 50), (128, 50), (40, 50), (128, 120)])
def test_layer_norm_matches_torch(mode, bias, C, rows):
    """rows=120 (3 x 120 x 128 floats) is past the kernel's one-thread limit: 2 threads, and the
    backward adds their partial weight and bias gradients."""
    torch.manual_seed(C)
    ln = torch.nn.LayerNorm(C, bias=bias)
    with torch.no_grad():
        ln.weight.normal_()
        if bias:
            ln.bias.normal_()
    f = fused.FusedLayerNorm.of(ln)
    assert f.weight is ln.weight and list(f.state_dict()) == list(ln.state_dict())
    x, g = torch.randn(3, rows, C) * 3 + 1, torch.randn(3, rows, C)
    results = []
    for module in (ln, f):  # the same Parameters: gradients are compared one module at a time
        ln.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(g)
        results.append([y.detach(), xi.grad] + [p.grad for p in ln.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation,bias", [("gelu_tanh", True), ("gelu", False)])
def test_fused_model_equals_plain_model(activation, bias):
    requires_kernels(fused)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                      activation=activation, bias=bias)
    plain = GPT(cfg)
    fast = copy.deepcopy(plain)
    assert fused.fuse_cpu_ops(fast)
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(type(block) is fused.FusedBlock for block in fast.transformer.h)
    assert all(type(block) is Block for block in plain.transformer.h)  # the original model is left alone
    x = torch.randint(0, 50, (3, 32))
    _, loss = plain(x, x)
    _, loss_f = fast(x, x)
    loss.backward()
    loss_f.backward()
    torch.testing.assert_close(loss_f, loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fuse_refuses_what_it_cannot_run(monkeypatch):
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32)
    assert not fused.fuse_cpu_ops(GPT(cfg).to(torch.bfloat16))
    monkeypatch.setattr(fused._kernels, "lib", False)
    model = GPT(cfg)
    assert not fused.fuse_cpu_ops(model)
    assert type(model.transformer.h[0]) is Block and type(model.transformer.ln_f) is torch.nn.LayerNorm


def _block(C, n_head, bias, activation, dropout=0.0):
    torch.manual_seed(C + n_head)
    cfg = ModelConfig(vocab_size=50, block_size=80, n_layer=2, n_head=n_head, n_embd=C, dropout=dropout,
                      activation=activation, bias=bias)
    block = Block(cfg)
    with torch.no_grad():
        for p in block.parameters():  # away from the identity init, so every term shows in the result
            p.add_(torch.randn_like(p) * 0.1)
    return block


@pytest.mark.parametrize("activation,bias", [("gelu_tanh", True), ("gelu", False)])
@pytest.mark.parametrize("B,T,C,n_head", [(2, 17, 32, 2), (1, 64, 128, 4), (2, 33, 128, 2), (3, 5, 96, 1)])
def test_block_kernel_equals_block(activation, bias, B, T, C, n_head):
    block = _block(C, n_head, bias, activation)
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(T)) * 2
    g = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1))
    results = []
    for fast in (False, True):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = fused.block_forward(block, xi) if fast else block(xi)
        if fast and fused.get_lib() is None:
            pytest.skip("compiled kernels not built")
        assert y is not None, "the block kernel declined a shape it takes"
        y.backward(g)
        results.append([y.detach(), xi.grad] + [p.grad for p in block.parameters()])
    names = ["y", "dx"] + [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, *results):  # float rounding, relative to each tensor's scale
        torch.testing.assert_close(b, a, atol=2e-6 * max(1.0, a.abs().max().item()), rtol=1e-4, msg=name)


def test_block_kernel_declines_what_it_cannot_run(monkeypatch):
    requires_kernels(fused)
    x = torch.randn(2, 8, 32)
    assert fused.block_forward(_block(32, 2, True, "gelu"), x) is not None
    assert fused.block_forward(_block(40, 2, True, "gelu"), torch.randn(2, 8, 40)) is None  # width % 16
    assert fused.block_forward(_block(48, 2, True, "gelu"), torch.randn(2, 8, 48)) is None  # head size 24
    dropped = _block(32, 2, True, "gelu", dropout=0.1)
    assert fused.block_forward(dropped, x) is None  # dropout while training
    assert fused.block_forward(dropped.eval(), x) is not None  # no dropout in eval
    assert fused.block_forward(_block(32, 2, True, "gelu").to(torch.bfloat16), x.bfloat16()) is None
    monkeypatch.setattr(fused._kernels, "lib", False)
    assert fused.block_forward(_block(32, 2, True, "gelu"), x) is None  # no built library


class _LoRA(torch.nn.Linear):
    """Stands in for an adapter that wraps a Linear (peft's LoRA): y = x W^T + b + x A^T B^T."""

    def __init__(self, base: torch.nn.Linear, r: int = 2):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.A = torch.nn.Parameter(torch.randn(r, base.in_features) * 0.3)
        self.B = torch.nn.Parameter(torch.randn(base.out_features, r) * 0.3)

    def forward(self, x):
        return super().forward(x) + x @ self.A.t() @ self.B.t()


def _adapted(block):
    """Three ways to change a block that a kernel reading its weights would miss."""
    lora = copy.deepcopy(block)
    lora.attn.c_attn = _LoRA(lora.attn.c_attn)
    hooked = copy.deepcopy(block)
    hooked.mlp.register_forward_hook(lambda m, inp, out: out * 1.5)
    extra = copy.deepcopy(block)
    extra.mlp = torch.nn.Sequential(extra.mlp, torch.nn.Linear(32, 32))  # a bottleneck adapter after the MLP
    return {"lora": lora, "hook": hooked, "extra": extra}


@pytest.mark.parametrize("kind", ["lora", "hook", "extra"])
def test_fused_block_runs_adapted_blocks_op_by_op(kind):
    """FusedBlock takes the whole-block kernel only for a block of its own plain parts; with an
    adapter it runs op by op, adapter included, forward and backward, equal to the unfused block."""
    requires_kernels(fused)
    block = _block(32, 2, True, "gelu_tanh").eval()
    plain_fused = fused.FusedBlock.of(block)
    assert fused.is_plain(block) and fused.is_plain(plain_fused)
    adapted = _adapted(block)[kind]
    fast = fused.FusedBlock.of(adapted)
    assert not fused.is_plain(fast)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    y_ref, (g_ref,) = _grads(adapted, x)
    y, (g,) = _grads(fast, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    assert (y - plain_fused(x)).abs().max() > 1e-3  # the adapter is in the output


def test_fuse_cpu_ops_swaps_modules_and_keeps_parameters():
    requires_kernels(fused)
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    model.transformer.h[1] = _adapted(model.transformer.h[1])["extra"]
    before = dict(model.named_parameters())

    assert fused.fuse_cpu_ops(model)
    b0 = model.transformer.h[0]
    assert type(b0) is fused.FusedBlock and type(b0.attn) is fused.FusedCausalSelfAttention
    assert type(b0.mlp) is fused.FusedMLP and type(b0.ln_1) is fused.FusedLayerNorm
    assert type(model.transformer.h[1]) is fused.FusedBlock and type(model.transformer.h[1].mlp) is torch.nn.Sequential
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[n] is p for n, p in before.items())
