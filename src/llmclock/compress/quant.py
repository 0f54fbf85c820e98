"""Weight-only quantization: bf16, int8 per output channel, int4 per group (symmetric).

    bf16   w ~ bf16(w)                                      (round to nearest even)
    int8   w[n, k] ~ s[n] * q[n, k],        q in [-127, 127], s[n] = max_k |w[n, k]| / 127
    int4   w[n, k] ~ s[n, g] * q[n, k],     q in [-8, 7],     s[n, g] = max_{k in g} |w[n, k]| / 7,
           g = k // group; stored as u = q + 8, two per byte (even k in the low nibble)

Symmetric (no zero points): a zero weight stays exactly zero (so unstructured pruning survives
quantization), and the kernels need one scale per group, no offset. Worst-case error per weight is
half a step: s/2, i.e. max|w| / 254 (int8) and max|w| of the group / 14 (int4); bf16 keeps 8
significant bits, a relative error of at most 2^-8.

A `QuantLinear` replaces an nn.Linear (gpt-fast's quantize.py: swap the module, keep the model
file). Its `reference` forward is torch ops (dequantize, then F.linear), correct on any device;
`forward` runs the compiled kernel instead for up to KERNEL_ROWS fp32 CPU rows without autograd (a
prompt's prefill: streaming the packed bytes a few times beats writing the whole fp32 weight, by
~3x for int8 and more for int4), `reference` otherwise; `decode_linear()` gives the engine a
function with kernels.make_linear's signature that runs the compiled kernel of csrc/quant.cpp,
which streams the packed bytes once and dequantizes in registers.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import cbuild
from ..errors import LLMClockError

SCHEMES = ("bf16", "int8", "int4")
GROUPS = (32, 64, 128)
PANEL = 16
KERNEL_ROWS = 64
"""QuantLinear.forward uses the compiled kernel up to this many rows (it streams the weights once per 4)."""
_FMT = {"bf16": 0, "int8": 1, "int4": 2}
_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "quant_linear": [_int, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, _int, _int, _int],
}
_kernels = cbuild.Library(_SIGNATURES)  # csrc/quant.cpp, built at install time into the one kernel library
get_lib = _kernels.get
"""The compiled quantized GEMV, or None where the kernel library is not built."""


# ---------------------------------------------------------------- quantize / dequantize


def quantize(w: torch.Tensor, scheme: str, group: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) float weight -> (stored weight, scales or None) in `scheme`'s storage layout."""
    w = w.detach().float()
    n, k = w.shape
    if scheme == "bf16":
        return w.to(torch.bfloat16), None
    if scheme == "int8":
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
        return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s
    if scheme == "int4":
        check_group(k, group)
        wg = w.view(n, k // group, group)  # (N, K/G, G)
        s = wg.abs().amax(dim=2).clamp(min=1e-12) / 7  # (N, K/G)
        u = (torch.round(wg / s[..., None]).clamp(-8, 7) + 8).to(torch.uint8).view(n, k)
        return u[:, 0::2] | (u[:, 1::2] << 4), s  # (N, K/2) bytes
    raise LLMClockError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, scheme: str) -> torch.Tensor:
    """The fp32 (out, in) weight that (q, scale) stands for."""
    if scheme == "bf16":
        return q.float()
    if scheme == "int8":
        return q.float() * scale[:, None]
    n, k = q.size(0), 2 * q.size(1)
    u = torch.stack([q & 15, q >> 4], dim=2).view(n, k)  # (N, K): low nibble first
    ngroups = scale.size(1)
    return ((u.float() - 8).view(n, ngroups, k // ngroups) * scale[..., None]).view(n, k)


def check_group(width: int, group: int) -> None:
    if group not in GROUPS:
        raise LLMClockError(f"group size must be one of {', '.join(map(str, GROUPS))}, got {group}")
    if width % group:
        raise LLMClockError(f"group size {group} does not divide the layer width {width}")


def error_bound(w: torch.Tensor, scheme: str, group: int = 64) -> torch.Tensor:
    """Per-weight worst-case |w - dequantize(quantize(w))| (half a quantization step)."""
    w = w.detach().float()
    if scheme == "bf16":
        return w.abs() * 2.0**-8
    if scheme == "int8":
        return (w.abs().amax(dim=1, keepdim=True) / 254).expand_as(w)
    n, k = w.shape
    return (w.view(n, k // group, group).abs().amax(dim=2, keepdim=True) / 14).expand(n, k // group, group).reshape(n, k)


# ---------------------------------------------------------------- packing for the kernel


def pack(q: torch.Tensor, scale: torch.Tensor | None, scheme: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Storage layout -> the kernel's panels of 16 output columns (see csrc/quant.cpp)."""
    n = q.size(0)
    np_ = (n + PANEL - 1) // PANEL
    pad = np_ * PANEL - n
    if scheme == "int4":
        k = 2 * q.size(1)
        u = torch.stack([q & 15, q >> 4], dim=2).view(n, k)
        u = F.pad(u, (0, 0, 0, pad), value=8)  # padded columns dequantize to 0
        u = u.view(np_, PANEL, k).transpose(1, 2)  # (np, K, 16)
        panels = (u[..., :8] | (u[..., 8:] << 4)).contiguous()  # (np, K, 8)
        s = F.pad(scale, (0, 0, 0, pad)).view(np_, PANEL, -1).transpose(1, 2).contiguous()  # (np, K/G, 16)
        return panels, s
    raw = q.view(torch.int16) if scheme == "bf16" else q
    panels = F.pad(raw, (0, 0, 0, pad)).view(np_, PANEL, -1).transpose(1, 2).contiguous()  # (np, K, 16)
    return panels, (F.pad(scale, (0, pad)).contiguous() if scale is not None else None)


def packed_bytes(module: "QuantLinear") -> int:
    """Bytes one decode pass over this layer reads (weights, scales, bias)."""
    return sum(t.numel() * t.element_size() for t in (module.weight, module.weight_scale, module.bias) if t is not None)


# ---------------------------------------------------------------- the module


class QuantLinear(nn.Module):
    """A frozen linear layer with weights in `scheme`; buffers `weight` (+ `weight_scale`), `bias`."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group: int = 64, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.group = in_features, out_features, scheme, group
        shape, dtype = {"bf16": ((out_features, in_features), torch.bfloat16),
                        "int8": ((out_features, in_features), torch.int8),
                        "int4": ((out_features, in_features // 2), torch.uint8)}[scheme]
        self.register_buffer("weight", torch.empty(shape, dtype=dtype))
        scale = {"bf16": None, "int8": (out_features,), "int4": (out_features, in_features // max(group, 1))}[scheme]
        self.register_buffer("weight_scale", torch.empty(scale) if scale else None)
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, group: int = 64) -> "QuantLinear":
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, scheme, group, bias is not None)
        m.weight, m.weight_scale = quantize(weight, scheme, group)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.scheme)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Torch ops: dequantize, then F.linear (what the kernels are tested against)."""
        w = self.dequantized().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
                and 0 < x.numel() <= KERNEL_ROWS * self.in_features and self.weight.device.type == "cpu"):
            f = self._kernel()
            if f is not None:
                return f(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return self.reference(x)

    def _kernel(self):
        """A kernel function on this layer's packed bytes, or None where there is no kernel library."""
        if get_lib() is None:
            return None
        f = make_quant_linear(self)
        return f if f.packed is not None else None

    def packed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernel's panels of these weights (see `pack`): made on first use and kept, remade if the
        weights change; the engine's decode functions and `forward` share them."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            cached = (key, pack(self.weight, self.weight_scale, self.scheme))
            self.__dict__["_packed"] = cached
        return cached[1]

    def __deepcopy__(self, memo):
        """A copy without the cached panels (remade from the copy's weights on first use)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        import copy

        new.__dict__ = {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_packed"}
        return new

    def extra_repr(self) -> str:
        g = f", group={self.group}" if self.scheme == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{g}"

    def decode_linear(self, *, packed: bool = True, approximate: str = "tanh"):
        """f(x, *, gelu=False, out=None, accumulate=False) as kernels.make_linear's, on this layer's
        packed bytes; torch ops where the kernel cannot run (no compiler, not fp32 on CPU, packed=False)."""
        return make_quant_linear(self, packed=packed, approximate=approximate)


def make_quant_linear(m: QuantLinear, *, packed: bool = True, approximate: str = "tanh"):
    n, k, scheme, bias = m.out_features, m.in_features, m.scheme, m.bias

    def torch_linear(x, *, gelu=False, out=None, accumulate=False):
        y = m.reference(x)
        if gelu:
            y = F.gelu(y, approximate=approximate)
        return y if out is None else (out.add_(y) if accumulate else out.copy_(y))

    lib = get_lib() if packed and m.weight.device.type == "cpu" else None
    if lib is None:
        torch_linear.packed = None
        return torch_linear
    panels, scales = m.packed()
    kernel, fmt, f32, w_ptr = lib.quant_linear, _FMT[scheme], torch.float32, panels.data_ptr()
    s_ptr = scales.data_ptr() if scales is not None else None
    b_ptr = bias.data_ptr() if bias is not None else None
    group, gelu_mode = (m.group if scheme == "int4" else 0), (1 if approximate == "tanh" else 2)

    def linear(x, *, gelu=False, out=None, accumulate=False):
        if x.dtype is not f32 or x.requires_grad or x.device.type != "cpu":
            return torch_linear(x, gelu=gelu, out=out, accumulate=accumulate)
        x = x.contiguous()  # a no-op for the engine's rows
        y = torch.empty(*x.shape[:-1], n) if out is None else out
        kernel(fmt, x.data_ptr(), x.numel() // k, k, k, w_ptr, s_ptr, group, n, b_ptr, y.data_ptr(), n,
               gelu_mode if gelu else 0, accumulate, torch.get_num_threads())
        return y

    linear.packed = (panels, scales)  # keeps the panels alive as long as the function
    linear.quant = (fmt, scales, group)  # what kernels.make_block needs to run this layer inside a block
    return linear
