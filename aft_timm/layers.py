"""AFT token mixers: drop-in replacements for attention, built on :mod:`aft_timm.ops`.

Each mixer projects its input with one fused ``qkv`` linear layer (rows: query D, key Dk, value D; Dk = D, or the
number of heads for AFT-conv), applies an AFT operator and an output projection. Position biases:

* AFT-full / AFT-local: factorized w = pos_u @ pos_v.T with pos_u, pos_v of shape (seq_len, bias_dim), initialized
  N(0, 0.01^2) so that w starts near 0 (paper section 3.2, Table 3), or a free (seq_len, seq_len) ``pos_w``.
* AFT-conv: a kernel per head, re-parameterized as gamma * (w - mean(w)) / std(w) + beta with gamma = beta = 0 at
  initialization, so every AFT-conv layer starts out as AFT-simple (paper section 3.3).
"""
from typing import Optional, Tuple, Union

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from . import ops

__all__ = ["AftFull", "AftLocal", "AftSimple", "AftConv1d", "AftConv2d", "reparameterize_kernel"]

_KERNEL_EPS = 1e-5


def reparameterize_kernel(weight: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """gamma * (w - mean(w)) / std(w) + beta per head; weight (H, ...), gamma and beta (H,)."""
    flat = weight.flatten(1)
    std, mean = torch.std_mean(flat, dim=1, correction=0, keepdim=True)
    return torch.addcmul(beta.unsqueeze(1), flat - mean, gamma.unsqueeze(1) / (std + _KERNEL_EPS)).view(weight.shape)


# The mixers' ``mix`` methods are ignored by TorchScript (the operators are plain Python), and an ignored method of a
# scripted module can only reach its attributes, so the helpers it needs are module-level functions.


def _pairwise_bias(mixer: str, pos_u: Optional[Tensor], pos_v: Optional[Tensor], pos_w: Optional[Tensor],
                   seq_len: int, length: int) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    if not 1 <= length <= seq_len:
        raise ValueError(f"{mixer} was built for sequences of up to seq_len={seq_len} positions, got T={length}")
    if pos_w is not None:
        return pos_w[:length, :length]
    return pos_u[:length], pos_v[:length]


class _AftMixer(nn.Module):
    """Fused q/k/v projection and output projection shared by every AFT mixer."""

    def __init__(self, dim: int, key_dim: int, qkv_bias: bool, proj_drop: float, device=None, dtype=None) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.key_dim = key_dim
        self.qkv = nn.Linear(dim, 2 * dim + key_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError("AFT token mixer expects input of shape (..., D) with D=" + str(self.dim)
                             + " channels, got shape " + str(list(x.shape)))
        q, k, v = self.qkv(x).split([self.dim, self.key_dim, self.dim], dim=-1)
        return self.proj_drop(self.proj(self.mix(q, k, v)))

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError


class _PairwiseBiasMixer(_AftMixer):
    """A mixer with a learned bias for each pair of positions, factorized or free."""

    def __init__(self, dim: int, seq_len: int, bias_dim: int, free_bias: bool, causal: bool, qkv_bias: bool,
                 proj_drop: float, device=None, dtype=None) -> None:
        super().__init__(dim, dim, qkv_bias, proj_drop, device=device, dtype=dtype)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.causal = causal
        self.free_bias = free_bias
        dd = {"device": device, "dtype": dtype}
        if free_bias:
            self.pos_w = nn.Parameter(torch.zeros(seq_len, seq_len, **dd))
            self.register_parameter("pos_u", None)
            self.register_parameter("pos_v", None)
        else:
            if bias_dim < 1:
                raise ValueError(f"bias_dim must be >= 1, got {bias_dim}")
            self.register_parameter("pos_w", None)
            self.pos_u = nn.Parameter(torch.empty(seq_len, bias_dim, **dd))
            self.pos_v = nn.Parameter(torch.empty(seq_len, bias_dim, **dd))
        self.reset_position_bias()

    def reset_position_bias(self) -> None:
        if self.free_bias:
            nn.init.zeros_(self.pos_w)
        else:
            nn.init.normal_(self.pos_u, std=1e-2)
            nn.init.normal_(self.pos_v, std=1e-2)

    @torch.jit.ignore
    def position_bias(self, length: Optional[int] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """The bias of the first ``length`` positions: (T, T), or the factors (u, v) of u @ v.T."""
        length = self.seq_len if length is None else length
        return _pairwise_bias(type(self).__name__, self.pos_u, self.pos_v, self.pos_w, self.seq_len, length)

    def extra_repr(self) -> str:
        bias = "free" if self.free_bias else f"factorized d'={self.pos_u.shape[1]}"
        return f"dim={self.dim}, seq_len={self.seq_len}, bias={bias}, causal={self.causal}"


@register_notrace_module
class AftFull(_PairwiseBiasMixer):
    """AFT-full (Eq. 2) token mixer on (B, T, D) sequences, T <= seq_len."""

    def __init__(self, dim: int, seq_len: int, bias_dim: int = 128, free_bias: bool = False, causal: bool = False,
                 qkv_bias: bool = True, proj_drop: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(dim, seq_len, bias_dim, free_bias, causal, qkv_bias, proj_drop, device=device, dtype=dtype)

    @torch.jit.ignore
    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        bias = _pairwise_bias("AftFull", self.pos_u, self.pos_v, self.pos_w, self.seq_len, q.shape[1])
        return ops.aft_full(q, k, v, bias, causal=self.causal)


@register_notrace_module
class AftLocal(_PairwiseBiasMixer):
    """AFT-local (Eq. 4) token mixer: the pairwise bias acts within ``window`` positions, 0 beyond."""

    def __init__(self, dim: int, seq_len: int, window: int, bias_dim: int = 64, free_bias: bool = False,
                 causal: bool = False, qkv_bias: bool = True, proj_drop: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(dim, seq_len, bias_dim, free_bias, causal, qkv_bias, proj_drop, device=device, dtype=dtype)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window

    @torch.jit.ignore
    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        bias = _pairwise_bias("AftLocal", self.pos_u, self.pos_v, self.pos_w, self.seq_len, q.shape[1])
        return ops.aft_local(q, k, v, bias, self.window, causal=self.causal)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"


@register_notrace_module
class AftSimple(_AftMixer):
    """AFT-simple (Eq. 5) token mixer on (B, T, D) sequences of any length."""

    def __init__(self, dim: int, causal: bool = False, qkv_bias: bool = True, proj_drop: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__(dim, dim, qkv_bias, proj_drop, device=device, dtype=dtype)
        self.causal = causal

    @torch.jit.ignore
    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ops.aft_simple(q, k, v, causal=self.causal)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, causal={self.causal}"


class _KernelBiasMixer(_AftMixer):
    """A mixer with ``num_heads`` heads, one key per head and a re-parameterized kernel bias per head."""

    def __init__(self, dim: int, num_heads: int, kernel_size: Tuple[int, ...], qkv_bias: bool, proj_drop: float,
                 device=None, dtype=None) -> None:
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if any(s < 1 for s in kernel_size):
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        super().__init__(dim, num_heads, qkv_bias, proj_drop, device=device, dtype=dtype)
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(num_heads, *kernel_size, **dd))
        self.gamma = nn.Parameter(torch.zeros(num_heads, **dd))
        self.beta = nn.Parameter(torch.zeros(num_heads, **dd))
        self.reset_kernel()

    def reset_kernel(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.gamma)
        nn.init.zeros_(self.beta)

    def kernel(self) -> Tensor:
        """The re-parameterized bias kernel, (num_heads, *kernel_size)."""
        return reparameterize_kernel(self.weight, self.gamma, self.beta)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}"


@register_notrace_module
class AftConv2d(_KernelBiasMixer):
    """AFT-conv (Eq. 6) token mixer on channels-last image grids (B, X, Y, D)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: Union[int, Tuple[int, int]], qkv_bias: bool = True,
                 proj_drop: float = 0.0, device=None, dtype=None) -> None:
        size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(size) != 2 or size[0] % 2 == 0 or size[1] % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred kernel), got {kernel_size}")
        super().__init__(dim, num_heads, size, qkv_bias, proj_drop, device=device, dtype=dtype)

    @torch.jit.ignore
    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if q.dim() != 4:
            raise ValueError(f"AftConv2d expects a channels-last grid (B, X, Y, D), got shape {tuple(q.shape)}")
        heads = (self.num_heads, self.head_dim)
        y = ops.aft_conv2d(q.unflatten(-1, heads).permute(0, 3, 4, 1, 2), k.permute(0, 3, 1, 2),
                           v.unflatten(-1, heads).permute(0, 3, 4, 1, 2),
                           reparameterize_kernel(self.weight, self.gamma, self.beta))
        return y.permute(0, 3, 4, 1, 2).flatten(-2)


@register_notrace_module
class AftConv1d(_KernelBiasMixer):
    """AFT-conv (Eq. 6) token mixer on (B, T, D) sequences; causal by default."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, causal: bool = True, qkv_bias: bool = True,
                 proj_drop: float = 0.0, device=None, dtype=None) -> None:
        if not causal and kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd in non-causal mode (a centred kernel), got {kernel_size}")
        super().__init__(dim, num_heads, (kernel_size,), qkv_bias, proj_drop, device=device, dtype=dtype)
        self.causal = causal

    @torch.jit.ignore
    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        heads = (self.num_heads, self.head_dim)
        y = ops.aft_conv1d(q.unflatten(-1, heads).permute(0, 2, 3, 1), k.transpose(1, 2),
                           v.unflatten(-1, heads).permute(0, 2, 3, 1),
                           reparameterize_kernel(self.weight, self.gamma, self.beta), causal=self.causal)
        return y.permute(0, 3, 1, 2).flatten(-2)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", causal={self.causal}"
