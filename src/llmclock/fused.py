"""Fused CPU kernels for the full-sequence forward and backward: whole blocks, and causal
attention, GELU and LayerNorm on their own. The C++ is in csrc/fused.cpp (built at install, see
llmclock/cbuild.py); this module gives it autograd Functions and modules to swap in.

Why (nanoGPT's CPU recipe: 4 layers, 128 wide, T=64, batch 12, 2 threads; measured here): a
training step through torch's ops was ~60 ms, of which the matmuls took ~30 ms at ~150 GFLOP/s,
most of what this CPU gives (one 512-bit FMA per cycle per core, ~175 GFLOP/s on both cores), while
causal SDPA forward + backward took ~8 ms, GELU ~6 ms, LayerNorm ~2 ms, and hundreds of small ops
and autograd nodes several ms more. Here:

  block      a whole transformer Block (LN, attention, projection, residual, LN, MLP, residual)
             is one C call forward and one backward, so a step's block work is 8 calls instead of
             ~300 dispatched ops. Matrix products go to the BLAS sgemm inside torch (MKL on x86
             builds), biases and residual adds are folded into them (the output is pre-filled and
             sgemm accumulates), and the forward keeps its activations in one buffer for the
             backward. 1.16x a step through the separate kernels below (same process, alternating).
  attention  reads q, k and v in place from c_attn's (B, T, 3C) output (no split, no transposes),
             writes y as (B, T, C) for c_proj and keeps each row's log-sum-exp; the backward
             recomputes the probabilities from it (as FlashAttention does) and writes one
             (B, T, 3C) gradient, so autograd needs no cat of three gradients. Per (batch, head)
             the score matrices live in cache and register-blocked loops do the products.
  gelu       GPT-2's tanh form or the exact erf form, forward and backward, with polynomial
             exp / normal cdf (libmvec's measured slower here).
  layernorm  forward keeps mean and 1/std per row; backward in one pass per row.

`fuse_cpu_ops(model)` swaps a GPT's modules (fp32 on the CPU) for subclasses that call them:
FusedBlock, FusedCausalSelfAttention, FusedMLP, FusedLayerNorm, sharing the same Parameters. A
FusedBlock uses the block kernel whenever its inputs allow (fp32 CPU tensors, no cache, no dropout
while training, width and head size multiples of 16, heads up to 128, torch's sgemm found, and the
block made of its own plain parts: no adapter, no hook, no wrapped Linear; or Linears carrying peft
LoRA/AdaLoRA without dropout, run as effective weights W + s*B@A, see kernel_params), else the separate
kernels where they apply, else torch's ops, with the same results to float rounding
(tests/test_fused.py). The model file stays plain PyTorch with no hooks.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cbuild import Library
from .model import MLP, Block, CausalSelfAttention


def _hand_over_sgemm(lib: ctypes.CDLL) -> None:
    """Give the kernels torch's own BLAS `sgemm_` (MKL in x86 builds of torch, exported by
    libtorch_cpu); without it (other builds) has_sgemm() stays 0 and blocks run op by op."""
    try:
        cpu = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        lib.set_sgemm(ctypes.cast(cpu.sgemm_, ctypes.c_void_p).value)
    except (OSError, AttributeError):
        pass


_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_ptrs = ctypes.POINTER(ctypes.c_void_p)  # an array of pointers
_kernels = Library({
    "gelu_fwd": [_ptr, _ptr, _i64, _int, _int],
    "gelu_bwd": [_ptr, _ptr, _ptr, _i64, _int, _int],
    "attn_fwd": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int],
    "attn_bwd": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _int],
    "ln_fwd": [_ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float, _ptr, _ptr, _ptr, _int],
    "ln_bwd": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _int],
    "set_sgemm": [_ptr],
    "has_sgemm": [],
    "block_saved_floats": [_i64, _i64, _i64, _i64],
    "block_work_floats": [_i64, _i64, _i64, _int],
    "block_fwd": [_ptr, _ptrs, _i64, _i64, _i64, _i64, ctypes.c_float, _int, _ptr, _ptr, _int],
    "block_bwd": [_ptr, _ptrs, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _ptr, _ptrs, _ptr, _int],
}, restypes={"has_sgemm": _int, "block_saved_floats": _i64, "block_work_floats": _i64}, on_load=_hand_over_sgemm)
get_lib = _kernels.get
"""The compiled kernel library (csrc/fused.cpp's entry points), or None where it is not built."""


def _ok(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approx: int):
        x = x.contiguous()
        y = torch.empty_like(x)
        get_lib().gelu_fwd(x.data_ptr(), y.data_ptr(), x.numel(), approx, torch.get_num_threads())
        ctx.save_for_backward(x)
        ctx.approx = approx
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        get_lib().gelu_bwd(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.numel(), ctx.approx, torch.get_num_threads())
        return dx, None


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head: int):
        B, T, C3 = qkv.shape
        hs = C3 // 3 // n_head
        qkv = qkv.contiguous()
        y = torch.empty(B, T, C3 // 3)
        lse = torch.empty(B, n_head, T)
        get_lib().attn_fwd(qkv.data_ptr(), B, T, n_head, hs, y.data_ptr(), lse.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(qkv, y, lse)
        ctx.n_head = n_head
        return y

    @staticmethod
    def backward(ctx, dy):
        qkv, y, lse = ctx.saved_tensors
        B, T, C3 = qkv.shape
        dy = dy.contiguous()
        dqkv = torch.empty_like(qkv)
        get_lib().attn_bwd(qkv.data_ptr(), y.data_ptr(), lse.data_ptr(), dy.data_ptr(), B, T, ctx.n_head,
                      C3 // 3 // ctx.n_head, dqkv.data_ptr(), torch.get_num_threads())
        return dqkv, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        C = x.size(-1)
        x = x.contiguous()
        n = x.numel() // C
        y, mean, rstd = torch.empty_like(x), torch.empty(n), torch.empty(n)
        get_lib().ln_fwd(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None, n, C, eps,
                    y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        C = x.size(-1)
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dw = torch.zeros_like(weight)
        db = torch.zeros_like(weight) if ctx.has_bias else None
        nt = torch.get_num_threads()
        scratch = torch.empty(nt * 2 * C)
        get_lib().ln_bwd(x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dy.data_ptr(), None,
                         mean.numel(), C, dx.data_ptr(), dw.data_ptr(), db.data_ptr() if db is not None else None,
                         scratch.data_ptr(), nt)
        return dx, dw, db, None


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm through the fused kernel (fp32 CPU, width a multiple of 16), else torch's; the
    same parameters and state dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fusable = len(self.normalized_shape) == 1 and self.normalized_shape[0] % 16 == 0  # the kernel's shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fusable or get_lib() is None or not _ok(x, self.weight):
            return super().forward(x)
        return _LayerNorm.apply(x, self.weight, self.bias, self.eps)

    @classmethod
    def of(cls, ln: nn.LayerNorm) -> "FusedLayerNorm":
        new = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=True, bias=ln.bias is not None)
        new.weight, new.bias = ln.weight, ln.bias  # the same Parameters: optimizers and state dicts see no change
        return new


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu(x, approximate=...) through the fused kernel when it applies, else F.gelu."""
    if get_lib() is None or not _ok(x):
        return F.gelu(x, approximate=approximate)
    return _Gelu.apply(x, int(approximate == "tanh"))


def causal_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal softmax attention straight from c_attn's output: (B, T, 3C) -> (B, T, C).

    Equal to splitting q, k, v into heads and calling scaled_dot_product_attention(is_causal=True);
    the kernel takes head sizes that are multiples of 16 up to 128 (GPT-2's is 64), SDPA the rest.
    """
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    if get_lib() is None or not _ok(qkv) or hs % 16 or hs > 128:
        q, k, v = qkv.view(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C3 // 3)
    return _CausalAttention.apply(qkv, n_head)


def _blas_ready() -> bool:
    """Whether the kernels are built and hold torch's sgemm (the block kernel's products)."""
    lib = get_lib()
    return lib is not None and bool(lib.has_sgemm())


def _block_params(block, linear=lambda lin: (lin.weight, lin.bias)) -> list:
    """A Block's 12 tensors in the kernel's order (None for an absent bias); `linear` gives each
    Linear's (weight, bias), by default its own."""
    a, m = block.attn, block.mlp
    (wa, ba), (wp, bp), (wf, bf), (wm, bm) = map(linear, (a.c_attn, a.c_proj, m.c_fc, m.c_proj))
    return [block.ln_1.weight, block.ln_1.bias, wa, ba, wp, bp, block.ln_2.weight, block.ln_2.bias, wf, bf, wm, bm]


def _addresses(ts) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[None if t is None else t.data_ptr() for t in ts])


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n_head: int, eps: float, approx: int, *params):
        B, T, C = x.shape
        x = x.contiguous()
        lib = get_lib()
        saved = torch.empty(lib.block_saved_floats(B, T, C, n_head))
        out = torch.empty_like(x)
        lib.block_fwd(x.data_ptr(), _addresses(params), B, T, C, n_head, eps, approx, out.data_ptr(),
                      saved.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(x, saved, *params)
        ctx.n_head, ctx.approx = n_head, approx
        return out

    @staticmethod
    def backward(ctx, dout):
        x, saved, *params = ctx.saved_tensors
        B, T, C = x.shape
        nt = torch.get_num_threads()
        dout = dout.contiguous()
        dx = torch.empty_like(x)
        grads = [None if p is None else torch.empty_like(p) for p in params]
        lib = get_lib()
        work = torch.empty(lib.block_work_floats(B, T, C, nt))
        lib.block_bwd(x.data_ptr(), _addresses(params), saved.data_ptr(), dout.data_ptr(), B, T, C, ctx.n_head,
                      ctx.approx, dx.data_ptr(), _addresses(grads), work.data_ptr(), nt)
        return (dx, None, None, None, *grads)


def block_forward(block, x: torch.Tensor, params: list | None = None) -> torch.Tensor | None:
    """A whole Block (attention and MLP with their norms and residual adds) as one kernel call each
    way; None where the kernel does not apply (then the Block runs op by op): anything but fp32 CPU
    tensors, a width or head size that is not a multiple of 16 (or a head over 128), dropout while
    training, LayerNorms without weights or with different eps, or no BLAS found. `params`: the 12
    tensors to run it with (kernel_params: a LoRA block's effective weights), default the block's own."""
    attn, mlp = block.attn, block.mlp
    params = _block_params(block) if params is None else params
    C = x.size(-1)
    hs = C // attn.n_head
    dropout = block.training and (attn.attn_dropout > 0 or attn.resid_dropout.p > 0 or mlp.dropout.p > 0)
    if (
        dropout or x.dim() != 3 or C % 16 or hs % 16 or hs > 128 or not _blas_ready()
        or block.ln_1.weight is None or block.ln_2.weight is None or block.ln_1.eps != block.ln_2.eps
        or params[8].shape != (4 * C, C) or x.numel() * 4 >= 2**31
        or not _ok(x, *(p for p in params if p is not None))
        or not all(p.is_contiguous() for p in params if p is not None)
    ):
        return None
    return _Block.apply(x, attn.n_head, block.ln_1.eps, int(mlp.approximate == "tanh"), *params)


def _recast(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` (a subclass of module's class that adds no state) holding module's own submodules,
    Parameters, buffers, hooks and settings: a swapped module that optimizers and state dicts see
    no change in."""
    new = cls.__new__(cls)
    new.__dict__ = {k: (v.copy() if isinstance(v, dict) else v) for k, v in vars(module).items()}
    return new


class FusedCausalSelfAttention(CausalSelfAttention):
    """CausalSelfAttention whose cache-free causal path (no dropout) runs `causal_attention`."""

    def forward(self, x: torch.Tensor, kv=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if kv is not None or (self.training and self.attn_dropout > 0):
            return super().forward(x, kv, attn_mask)
        return self.resid_dropout(self.c_proj(causal_attention(self.c_attn(x), self.n_head)))


class FusedMLP(MLP):
    """MLP with the fused GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu(self.c_fc(x), approximate=self.approximate)))


_PLAIN_PARTS = {"": Block, "ln_1": nn.LayerNorm, "attn": CausalSelfAttention, "attn.c_attn": nn.Linear,
                "attn.c_proj": nn.Linear, "attn.resid_dropout": nn.Dropout, "ln_2": nn.LayerNorm, "mlp": MLP,
                "mlp.c_fc": nn.Linear, "mlp.c_proj": nn.Linear, "mlp.dropout": nn.Dropout}


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _parts_ok(block: nn.Module, linear_ok) -> bool:
    """Whether `block` is a Block of its own parts with no hooks, each Linear slot passing `linear_ok`
    (which answers for the slot's whole subtree)."""
    n = 0
    linears = []
    for name, m in block.named_modules():
        if any(name.startswith(lin + ".") for lin in linears):
            continue  # inside a Linear slot: linear_ok judged it
        want = _PLAIN_PARTS.get(name)
        if want is nn.Linear:
            if _hooked(m) or not linear_ok(m):
                return False
            linears.append(name)
        elif want is None or not isinstance(m, want) or _hooked(m):
            return False
        n += 1
    return n == len(_PLAIN_PARTS)


def is_plain(block: nn.Module, *, own_kernels: bool = False) -> bool:
    """Whether `block` is a Block made of its own parts only, so a kernel that reads its weights
    directly computes what its forward would: no extra modules (an adapter), no hooks, and every
    Linear a plain nn.Linear (not one wrapped or subclassed by peft's LoRA or a quantizer); with
    `own_kernels`, also a layer that brings its own decode kernel (`decode_linear`: llmclock.compress's
    quantized layers)."""
    return _parts_ok(block, lambda m: type(m) is nn.Linear or (own_kernels and hasattr(type(m), "decode_linear")))


def _peft_lowrank_types() -> tuple:
    """peft's LoRA and AdaLoRA Linear layers, when peft is already imported (else nothing to match)."""
    import sys

    if "peft" not in sys.modules:
        return ()
    from peft.tuners.adalora.layer import SVDLinear
    from peft.tuners.lora.layer import Linear as LoraLinear

    return (LoraLinear, SVDLinear)


def _no_dropout(d: nn.Module) -> bool:
    return type(d) is nn.Identity or (type(d) is nn.Dropout and (d.p == 0 or not d.training))


def lowrank_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) that a plain Linear needs to compute what `m` does: m's own for a plain
    nn.Linear; W + s*B@A for a peft LoRA layer (W + s/r'*B@(A*E) for AdaLoRA's SVD form), built
    with torch ops so autograd carries the kernel's weight gradient dW' to the factors
    (dA = s*B^T dW', dB = s*dW' A^T) and the frozen W gets none. None where that is not exact:
    dropout on the LoRA input while training, DoRA or another variant, a LoRA bias,
    fan_in_fan_out, merged or disabled adapters, hooks, or any other wrapper."""
    if type(m) is nn.Linear:
        return m.weight, m.bias
    types = _peft_lowrank_types()
    if type(m) not in types or any(_hooked(sub) for sub in m.modules()):
        return None
    base = m.base_layer
    if (type(base) is not nn.Linear or m.merged or m.disable_adapters or getattr(m, "fan_in_fan_out", False)
            or getattr(m, "lora_variant", None)):
        return None
    w = base.weight
    for name in m.active_adapters:
        if name not in m.lora_A.keys():
            continue
        if not _no_dropout(m.lora_dropout[name]) or getattr(m, "use_dora", {}).get(name, False):
            return None
        A, B, s = m.lora_A[name], m.lora_B[name], m.scaling[name]
        if type(m) is types[0]:  # LoRA: B(A(x)) * s
            if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
                return None
            w = w + (B.weight @ A.weight) * s
        else:  # AdaLoRA: x @ (A*E)^T @ B^T * s / (ranknum + 1e-5)
            w = w + (B @ (A * m.lora_E[name])) * (s / (m.ranknum[name] + 1e-5))
    return w, base.bias


def kernel_params(block: nn.Module) -> list | None:
    """The block kernel's 12 tensors when it computes exactly what `block`'s forward would: a plain
    block's own (is_plain), or, for a block whose Linears carry peft LoRA/AdaLoRA (no dropout while
    training), the effective weights of lowrank_weight; None when it must run op by op."""
    if is_plain(block):
        return _block_params(block)
    found = {}

    def take(lin: nn.Module) -> bool:
        found[id(lin)] = lowrank_weight(lin)  # built once per forward
        return found[id(lin)] is not None

    if not _parts_ok(block, take):
        return None
    return _block_params(block, lambda lin: found[id(lin)])


class FusedBlock(Block):
    """Block whose cache-free forward is one kernel call each way (`block_forward`) while it is made
    of its own plain parts (`is_plain`) or its Linears carry LoRA it can fold in (`kernel_params`),
    else op by op through its (fused) submodules."""

    def forward(self, x: torch.Tensor, kv=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if kv is None:
            params = kernel_params(self)
            y = None if params is None else block_forward(self, x, params)
            if y is not None:
                return y
        return super().forward(x, kv, attn_mask)

    @classmethod
    def of(cls, block: Block) -> "FusedBlock":
        """The fused version of `block`, sharing its Parameters (and any parts someone swapped in,
        which then run as they are)."""
        new = _recast(block, cls)
        if type(block.attn) is CausalSelfAttention:
            new.attn = _recast(block.attn, FusedCausalSelfAttention)
        if type(block.mlp) is MLP:
            new.mlp = _recast(block.mlp, FusedMLP)
        for name in ("ln_1", "ln_2"):
            if type(getattr(block, name)) is nn.LayerNorm:
                setattr(new, name, FusedLayerNorm.of(getattr(block, name)))
        return new


def fuse_cpu_ops(model: nn.Module) -> bool:
    """Swap `model`'s (a GPT's) blocks for FusedBlocks and its final LayerNorm for FusedLayerNorm, in
    place; False (model unchanged) when the kernels are not built or the parameters are not fp32 on
    the CPU. Blocks of another class than Block (someone's own) are left as they are."""
    if get_lib() is None or not all(_ok(p) for p in model.parameters()):
        return False
    h = model.transformer.h
    for i, block in enumerate(h):
        if type(block) is Block:
            h[i] = FusedBlock.of(block)
    if type(model.transformer.ln_f) is nn.LayerNorm:
        model.transformer.ln_f = FusedLayerNorm.of(model.transformer.ln_f)
    return True
