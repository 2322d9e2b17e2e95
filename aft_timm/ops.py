"""Functional Attention Free Transformer (AFT) operators.

Every operator evaluates, for each channel c of each position t,

    y[t, c] = sigmoid(q[t, c]) * sum_{t'} exp(k[t', c] + b(t, t')) v[t', c] / sum_{t'} exp(k[t', c] + b(t, t'))

over all t' (or t' <= t when ``causal``), with the position bias b of the variant (Zhai et al., 2021, Eq. 2-6).
Inputs are batch-first; ``q`` is the raw query (the sigmoid is applied here). float16 and bfloat16 inputs are
accepted: exponentials are taken in float32 and the output has the input dtype.

How the operators stay exact, stable and linear in memory:

* Constants that depend only on (t, channel) cancel in the ratio: keys are shifted by a maximum, and each bias row
  by r_t = max(0, max_t' b(t, t')), so that every weight exp(b - r_t) or exp(-r_t) is at most 1.
* Positions are cut into chunks of C. Key chunks within reach of the bias are weighed directly by batch-free
  (C x C) weight blocks, one batched matmul per chunk lag; chunks beyond reach carry the uniform weight exp(-r_t)
  and enter through prefix (and, non-causal, suffix) sums over chunks. Nothing of size T x T is built except
  exp(w) for a dense AFT-full bias, and nothing with both a batch and a T x T extent. Weights are never formed as
  1 + (exp(b) - 1), which cancels for very negative b.
* Causal mode uses each position's own running maximum of the keys: earlier chunks are exact relative to their
  chunk maximum (never above the running maximum). A row's own chunk is taken relative to the largest key in reach,
  unless a later key of that chunk dwarfs the row's visible ones (by e^60): then that chunk is evaluated row by row
  against each row's running maximum, exact for any spread of keys.
* aft_conv2d is a depth-wise convolution of exp(k) v and exp(k) with exp(w) - 1 plus a global sum, or, for kernels
  with weights below -3 (where that sum would cancel), a direct kernel box plus cancellation-free sums outside it.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["aft_full", "aft_local", "aft_simple", "aft_conv1d", "aft_conv2d", "PositionBias"]

# aft_conv2d takes its fast path while every kernel weight is >= -3 (exp(w) >= 0.05): then the global sum plus an
# (exp(w) - 1) correction loses at most ~20 ulps to cancellation
_CONV_CANCELLATION_SAFE = 3.0

PositionBias = Union[Tensor, Tuple[Tensor, Tensor]]
"""A dense (T, T) bias, or a pair (u, v) of (T, d') factors standing for u @ v.T."""

_BASE_CHUNK = 64  # positions per chunk: large enough for efficient matmuls, small enough for a cheap band
_FLOAT32_SAFE_SPREAD = 60.0  # exp(-60) times any weight stays well inside float32's normal range
_MAX_CHUNKS = 128  # beyond this many chunks the chunk grows: the (chunks x chunks) prefix weights stay O(T)


# ----------------------------------------------------------------------------------------------------------------
# argument checks


def _shape(x: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def _check_tensor(name: str, x, ndim: int, expected: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {expected}, got {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tuple[int, int, int]:
    _check_tensor("q", q, 3, "(B, T, D)")
    B, T, D = q.shape
    for name, x in (("k", k), ("v", v)):
        _check_tensor(name, x, 3, f"(B, T, D) = ({B}, {T}, {D}) like q")
        if x.shape != q.shape:
            raise ValueError(f"{name} must have shape ({B}, {T}, {D}) like q, got {_shape(x)}")
    if T == 0:
        raise ValueError("q, k, v must have at least one position (T >= 1)")
    return B, T, D


def _check_bias(w: PositionBias, T: int) -> None:
    if isinstance(w, (tuple, list)):
        if len(w) != 2:
            raise ValueError(f"w must be a (T, T) tensor or a pair (u, v) of (T, d') factors, got {len(w)} items")
        u, v = w
        _check_tensor("w[0] (u)", u, 2, f"({T}, d')")
        _check_tensor("w[1] (v)", v, 2, f"({T}, d')")
        if u.shape[0] != T or v.shape != u.shape:
            raise ValueError(f"w factors must both have shape ({T}, d'), got {_shape(u)} and {_shape(v)}")
    else:
        _check_tensor("w", w, 2, f"({T}, {T})")
        if w.shape != (T, T):
            raise ValueError(f"w must have shape ({T}, {T}) for T={T} positions, got {_shape(w)}")


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return window


def _holds(condition: Tensor) -> bool:
    """A data-dependent choice between two exact paths of the same shape; on the meta device (no data), the first."""
    return condition.device.type == "meta" or bool(condition)


def _exp_from_max(x: Tensor, dim: Union[int, Tuple[int, ...]]) -> Tensor:
    """exp(x - max of x over dim): a constant along dim cancels in AFT's ratio, and every value is <= 1."""
    return torch.exp(x - x.amax(dim=dim, keepdim=True).detach())


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# the chunked engine


def _chunk_size(T: int) -> int:
    chunk = _BASE_CHUNK
    while T > chunk * _MAX_CHUNKS:
        chunk *= 2
    return min(chunk, T)


def _scale(x: Tensor, s: Tensor) -> Tensor:
    """Multiply the concatenated [numerator, denominator] channels of x by a per-key-channel scale s."""
    if s.shape[-1] == 1 or s.shape[-1] == x.shape[-1]:
        return x * s
    return (x.unflatten(-1, (2, s.shape[-1])) * s.unsqueeze(-2)).flatten(-2)


def _shift(x: Tensor, dim: int, n: int, value: float = 0.0) -> Tensor:
    """out[i] = x[i - n] along dim, filled with value where i - n is out of range."""
    size = x.shape[dim]
    if n == 0:
        return x
    if abs(n) >= size:
        return torch.full_like(x, value)
    fill = torch.full_like(x.narrow(dim, 0, abs(n)), value)
    if n > 0:
        return torch.cat([fill, x.narrow(dim, 0, size - n)], dim=dim)
    return torch.cat([x.narrow(dim, -n, size + n), fill], dim=dim)


def _band_lags(reach: int, chunk: int, num_chunks: int, causal: bool) -> List[int]:
    """Chunk lags i - j that hold key chunks j within ``reach`` positions of row chunk i."""
    if reach <= 0:
        return [0]
    p = min(-(-reach // chunk), num_chunks - 1)
    return list(range(0, p + 1)) if causal else list(range(-p, p + 1))


def _band_offsets(lags: Sequence[int], chunk: int, device: torch.device) -> Tensor:
    """t - t' for every (lag, row r, column c) of the bias blocks: (L, C, C)."""
    lag = torch.tensor(list(lags), device=device).view(-1, 1, 1)
    r = torch.arange(chunk, device=device).view(1, -1, 1)
    c = torch.arange(chunk, device=device).view(1, 1, -1)
    return lag * chunk + r - c


def _mask_band(blocks: Tensor, lags: Sequence[int], chunk: int, lo: int, hi: int) -> Tensor:
    """Keep bias entries with lo <= t - t' <= hi, -inf elsewhere. blocks: (L, Hb, nCb, C, C)."""
    d = _band_offsets(lags, chunk, blocks.device)
    keep = ((d >= lo) & (d <= hi)).unsqueeze(1).unsqueeze(1)
    return blocks.masked_fill(~keep, float("-inf"))


def _dense_blocks(w: Tensor, lags: Sequence[int], chunk: int, num_chunks: int) -> Tensor:
    """Bias blocks (L, 1, nC, C, C) of a dense (T, T) bias: block i of lag l holds rows of chunk i, keys of i - l."""
    T = w.shape[0]
    pad = num_chunks * chunk - T
    wp = F.pad(w, (0, pad, 0, pad), value=float("-inf"))
    grid = wp.view(num_chunks, chunk, num_chunks, chunk).transpose(1, 2)  # (i, j, r, c)
    out = []
    for lag in lags:
        diag = torch.diagonal(grid, offset=-lag, dim1=0, dim2=1).permute(2, 0, 1)  # (n, C, C)
        missing = num_chunks - diag.shape[0]
        diag = F.pad(diag, (0, 0, 0, 0, missing, 0) if lag >= 0 else (0, 0, 0, 0, 0, missing), value=float("-inf"))
        out.append(diag)
    return torch.stack(out).unsqueeze(1)


def _factor_blocks(u: Tensor, v: Tensor, lags: Sequence[int], chunk: int, num_chunks: int) -> Tensor:
    """Bias blocks (L, 1, nC, C, C) of w = u @ v.T, computing only the blocks on the given lags."""
    pad = num_chunks * chunk - u.shape[0]
    uc = F.pad(u, (0, 0, 0, pad)).view(num_chunks, chunk, -1)
    vc = F.pad(v, (0, 0, 0, pad)).view(num_chunks, chunk, -1)
    return torch.stack([uc @ _shift(vc, 0, lag).transpose(-1, -2) for lag in lags]).unsqueeze(1)


def _toeplitz_blocks(w: Tensor, lags: Sequence[int], chunk: int, causal: bool) -> Tensor:
    """Bias blocks (L, H, 1, C, C) of per-head 1-D kernels w (H, s), -inf outside the kernel."""
    s = w.shape[-1]
    offset = -_band_offsets(lags, chunk, w.device)  # t' - t
    index = offset + (s - 1 if causal else (s - 1) // 2)
    inside = (index >= 0) & (index < s)
    blocks = w[:, index.clamp(0, s - 1)]  # (H, L, C, C)
    blocks = blocks.masked_fill(~inside, float("-inf"))
    return blocks.transpose(0, 1).unsqueeze(2)


def _near_blocks(x: Tensor, weights: Tensor, lags: Sequence[int],
                 key_max: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """sum over lags of weights[l] @ (key chunk i - lags[l]) for every row chunk i, as one batched matmul.

    Args:
        x: time-major chunks (H, nC, C, B, D2), each relative to its own chunk max when key_max is given.
        weights: (L, Hb, nCb, C, C) for the consecutive lags ``lags``.
        key_max: a pair (chunk_max, reference) of (H, nC, 1, B, Dk) tensors: x's chunk maxima, and the reference
            of each row chunk that all its key chunks are rescaled to.
    Returns:
        (H, nC, C, B, D2).
    """
    H, nC, C, B, D2 = x.shape
    lo, hi = lags[0], lags[-1]
    L = hi - lo + 1
    # window l of row chunk i is key chunk i - (hi - l): a strided view over the padded chunks, copied once below
    padded = F.pad(x, (0, 0, 0, 0, 0, 0, hi, max(0, -lo)))
    keys = padded.unfold(1, L, 1)[:, :nC].permute(0, 1, 5, 2, 3, 4)  # (H, nC, L, C, B, D2)
    if key_max is not None:
        chunk_max, reference = key_max
        window_max = F.pad(chunk_max, (0, 0, 0, 0, 0, 0, hi, max(0, -lo)), value=float("-inf"))
        window_max = window_max.unfold(1, L, 1)[:, :nC].permute(0, 1, 5, 2, 3, 4)  # (H, nC, L, 1, B, Dk)
        keys = _scale(keys, torch.exp(window_max - reference.unsqueeze(2)))
    w = weights.flip(0).permute(1, 2, 3, 0, 4).reshape(*weights.shape[1:3], C, L * C)
    return (w @ keys.reshape(H, nC, L * C, B * D2)).view(H, nC, C, B, D2)


def _weighted_average(k: Tensor, v: Tensor, bias: Union[Tensor, None], lags: Sequence[int], causal: bool,
                      chunk: int) -> Tensor:
    """sum_t' exp(k + b) v / sum_t' exp(k + b), b = bias inside the band and 0 outside it.

    Args:
        k: keys (B, H, T, Dk), Dk = Dv or 1 (one key per head, shared by its channels).
        v: values (B, H, T, Dv).
        bias: bias blocks (L, Hb, nCb, C, C) with -inf outside the band (see _dense_blocks), or None.
        lags: chunk lag of each block; causal lags are 0, 1, ..., P.
        causal: restrict to t' <= t.
        chunk: the chunk size C.
    Returns:
        (B, H, T, Dv), a permuted view of time-major memory.
    """
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    nC = -(-T // chunk)
    # time-major (H, T, B, D): batch and channels share the matmuls' wide dimension, weights stay batch-free
    k = k.permute(1, 2, 0, 3)
    v = v.permute(1, 2, 0, 3)
    pad = nC * chunk - T
    if pad:  # padded keys are -inf: they add nothing, and in causal mode no real position sees them anyway
        k = F.pad(k, (0, 0, 0, 0, 0, pad), value=float("-inf"))
        v = F.pad(v, (0, 0, 0, 0, 0, pad))
    kc = k.reshape(H, nC, chunk, B, Dk)
    vc = v.reshape(H, nC, chunk, B, Dv)

    if bias is not None:
        # weights exp(b - r) in the band and exp(-r) outside, r = max(0, row max of b): all <= 1
        row_max = bias.amax(dim=(0, -1)).clamp_min(0).detach()  # (Hb, nCb, C)
        outside = torch.exp(-row_max).unsqueeze(-1)
        weights = torch.where(bias > float("-inf"), torch.exp(bias - row_max.unsqueeze(-1)), outside)
        outside = outside.unsqueeze(-1)  # (Hb, nCb, C, 1, 1)
    else:
        outside = torch.ones((), dtype=k.dtype, device=k.device)
        weights = torch.ones(1, 1, 1, chunk, chunk, dtype=k.dtype, device=k.device)
    reach = max(abs(lag) for lag in lags)  # chunks beyond this lag only see the weight exp(-r)

    if not causal:
        e = _exp_from_max(kc, (1, 2))
        x = torch.cat([e * vc, e], dim=-1)  # (H, nC, C, B, Dv + Dk)
        out = _near_blocks(x, weights, lags)
        if nC > reach + 1:
            sums = x.sum(dim=2, keepdim=True)
            before = _shift(sums.cumsum(dim=1), 1, reach + 1)
            after = _shift(sums.flip(1).cumsum(dim=1).flip(1), 1, -(reach + 1))
            out = out + (before + after) * outside
    else:
        visible = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
        weights = torch.cat([torch.where(visible, weights[:1], torch.zeros_like(weights[:1])), weights[1:]])
        m = torch.cummax(k, dim=1).values.detach().reshape(H, nC, chunk, B, Dk)  # running max per position
        chunk_max = kc.amax(dim=2, keepdim=True).detach()  # (H, nC, 1, B, Dk)
        e = torch.exp(kc - chunk_max)
        x = torch.cat([e * vc, e], dim=-1)  # relative to each chunk's own max
        ref = torch.stack([_shift(chunk_max, 1, lag, float("-inf")) for lag in lags]).amax(dim=0)

        # chunks beyond reach: prefix sums over chunks, each relative to the running max of chunk maxima
        if nC > reach + 1:
            sums = x.sum(dim=2)  # (H, nC, B, Dv + Dk)
            cmax = chunk_max.squeeze(2)  # (H, nC, B, Dk)
            prefix_max = torch.cummax(cmax, dim=1).values
            later = ~torch.ones(nC, nC, dtype=torch.bool, device=k.device).tril().view(nC, nC, 1, 1)
            exponent = (cmax.unsqueeze(1) - prefix_max.unsqueeze(2)).masked_fill(later, float("-inf"))
            decay = torch.exp(exponent)  # (H, i, j, B, Dk): chunk j's weight in prefix i, 0 for j > i
            prefix = _scale(sums.unsqueeze(1), decay).sum(dim=2)  # (H, nC, B, Dv + Dk)
            far = _shift(prefix, 1, reach + 1).unsqueeze(2) * outside
            far_max = _shift(prefix_max, 1, reach + 1, float("-inf")).unsqueeze(2)  # (H, nC, 1, B, Dk)
        else:
            far = far_max = None

        if _holds((ref - m).amax() <= _FLOAT32_SAFE_SPREAD):
            # every row sees a key within e^60 of its chunk's reference, so one reference per chunk serves all its
            # rows: numerator and denominator share it, and it cancels in their ratio
            reference = ref if far_max is None else torch.maximum(ref, far_max)
            out = _near_blocks(x, weights, lags, (chunk_max, reference))
            if far is not None:
                out = out + _scale(far, torch.exp(far_max - reference))
        else:
            # some row's visible keys are dwarfed by later keys of its own chunk: relative to the chunk max they
            # would underflow, so that chunk is evaluated row by row against each row's own running max
            diff = (kc.unsqueeze(2) - m.unsqueeze(3)).masked_fill(~visible.view(chunk, chunk, 1, 1), float("-inf"))
            own = torch.exp(diff) * weights[0].view(*weights.shape[1:], 1, 1)  # (H, nC, C, C', B, Dk)
            values = torch.cat([vc, torch.ones_like(vc[..., :1]).expand(*vc.shape[:-1], Dk)], dim=-1)
            out = _scale(values.unsqueeze(2), own).sum(dim=3)
            if len(lags) > 1:
                # earlier chunks are all visible: relative to the running max at the chunk's first row
                first = m[:, :, :1]
                earlier = _near_blocks(x, weights[1:], lags[1:], (chunk_max, first))
                out = out + _scale(earlier, torch.exp(first - m))
            if far is not None:
                out = out + _scale(far, torch.exp(far_max - m))

    y = out[..., :Dv] / out[..., Dv:]  # (H, nC, C, B, Dv)
    return y.reshape(H, nC * chunk, B, Dv)[:, :T].permute(2, 0, 1, 3)


def _sequence_op(q: Tensor, k: Tensor, v: Tensor, bias_of, reach: int, causal: bool) -> Tensor:
    """Shared driver of aft_full / aft_local / aft_simple on (B, T, D) inputs."""
    dtype = _compute_dtype(q, k, v)
    T = q.shape[1]
    chunk = _chunk_size(T)
    lags = _band_lags(reach, chunk, -(-T // chunk), causal)
    bias = bias_of(lags, chunk, dtype) if bias_of is not None else None
    y = _weighted_average(k.to(dtype).unsqueeze(1), v.to(dtype).unsqueeze(1), bias, lags, causal, chunk)
    return (torch.sigmoid(q.to(dtype)) * y.squeeze(1)).to(q.dtype)


def _bias_blocks(w: PositionBias, T: int, window: int, causal: bool):
    """A function (lags, chunk, dtype) -> bias blocks of w restricted to |t - t'| < window (t' <= t if causal)."""

    def blocks(lags: Sequence[int], chunk: int, dtype: torch.dtype) -> Tensor:
        nC = -(-T // chunk)
        if isinstance(w, (tuple, list)):
            b = _factor_blocks(w[0].to(dtype), w[1].to(dtype), lags, chunk, nC)
        else:
            b = _dense_blocks(w.to(dtype), lags, chunk, nC)
        return _mask_band(b, lags, chunk, 0 if causal else 1 - window, window - 1)

    return blocks


# ----------------------------------------------------------------------------------------------------------------
# public operators


def aft_full(q: Tensor, k: Tensor, v: Tensor, w: PositionBias, causal: bool = False) -> Tensor:
    """AFT-full (Eq. 2): a learned bias w[t, t'] for every pair of positions.

    Args:
        q: raw queries (B, T, D).
        k: keys (B, T, D).
        v: values (B, T, D).
        w: position bias (T, T), or a pair (u, v) of (T, d') factors meaning u @ v.T.
        causal: attend only to t' <= t.
    Returns:
        (B, T, D) in the dtype of q. Memory: exp(w) is the only T x T tensor, and it has no batch dimension.
    """
    B, T, D = _check_qkv(q, k, v)
    _check_bias(w, T)
    if causal:
        return _sequence_op(q, k, v, _bias_blocks(w, T, T, True), T, True)
    dtype = _compute_dtype(q, k, v)
    dense = w[0].to(dtype) @ w[1].to(dtype).T if isinstance(w, (tuple, list)) else w.to(dtype)
    weights = _exp_from_max(dense, 1)  # (T, T), batch-free
    e = _exp_from_max(k.to(dtype), 1)
    x = torch.cat([e * v.to(dtype), e], dim=-1)  # (B, T, 2D)
    # one (T, T) @ (T, B * 2D) product: a batched matmul would broadcast exp(w) over the batch
    num_den = (weights @ x.transpose(0, 1).reshape(T, -1)).view(T, B, 2 * D).transpose(0, 1)
    y = num_den[..., :D] / num_den[..., D:]
    return (torch.sigmoid(q.to(dtype)) * y).to(q.dtype)


def aft_local(q: Tensor, k: Tensor, v: Tensor, w: PositionBias, window: int, causal: bool = False) -> Tensor:
    """AFT-local (Eq. 4): bias w[t, t'] where |t - t'| < window, 0 (not -inf) elsewhere.

    Every position still sees every other; only the bias is local. Time O(T * window * D), memory
    O(T * (window + D)): only the band of w is read, and for factors (u, v) only the band of u @ v.T is built.

    Args:
        q: raw queries (B, T, D).
        k: keys (B, T, D).
        v: values (B, T, D).
        w: position bias (T, T), or a pair (u, v) of (T, d') factors meaning u @ v.T.
        window: band size s >= 1; causal mode uses t' in {t - s + 1, ..., t}.
        causal: attend only to t' <= t.
    Returns:
        (B, T, D) in the dtype of q.
    """
    B, T, D = _check_qkv(q, k, v)
    _check_bias(w, T)
    window = _check_window(window)
    return _sequence_op(q, k, v, _bias_blocks(w, T, window, causal), min(window, T) - 1, causal)


def aft_simple(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """AFT-simple (Eq. 5): no position bias; sigmoid(q) times a softmax-over-time average of v.

    Args:
        q: raw queries (B, T, D).
        k: keys (B, T, D).
        v: values (B, T, D).
        causal: attend only to t' <= t.
    Returns:
        (B, T, D) in the dtype of q. Time and memory O(T * D).
    """
    _check_qkv(q, k, v)
    if causal:
        return _sequence_op(q, k, v, None, 0, True)
    dtype = _compute_dtype(q, k, v)
    e = _exp_from_max(k.to(dtype), 1)
    y = (e * v.to(dtype)).sum(dim=1, keepdim=True) / e.sum(dim=1, keepdim=True)
    return (torch.sigmoid(q.to(dtype)) * y).to(q.dtype)


def _check_conv(q: Tensor, k: Tensor, v: Tensor, w: Tensor, spatial: int) -> None:
    grid = ("T",) if spatial == 1 else ("X", "Y")
    _check_tensor("q", q, 3 + spatial, "(B, H, C, " + ", ".join(grid) + ")")
    B, H, C = q.shape[:3]
    size = tuple(q.shape[3:])
    expected_qv = (B, H, C) + size
    expected_k = (B, H) + size
    _check_tensor("v", v, 3 + spatial, str(expected_qv))
    if v.shape != q.shape:
        raise ValueError(f"v must have shape {expected_qv} like q, got {_shape(v)}")
    _check_tensor("k", k, 2 + spatial, str(expected_k) + " (one key per head and position)")
    if tuple(k.shape) != expected_k:
        raise ValueError(f"k must have shape {expected_k} (one key per head and position), got {_shape(k)}")
    kernel = "(H, s)" if spatial == 1 else "(H, sx, sy)"
    _check_tensor("w", w, 1 + spatial, f"{kernel} with H={H}")
    if w.shape[0] != H:
        raise ValueError(f"w must have shape {kernel} with H={H} heads, got {_shape(w)}")
    if min(size) < 1:
        raise ValueError(f"q must have at least one position, got shape {_shape(q)}")


def aft_conv1d(q: Tensor, k: Tensor, v: Tensor, w: Tensor, causal: bool = False) -> Tensor:
    """AFT-conv on sequences (Eq. 6): per-head kernel bias, one key per head shared by the head's channels.

    Args:
        q: raw queries (B, H, C, T).
        k: keys (B, H, T), one per head and position.
        v: values (B, H, C, T).
        w: kernels (H, s). Causal: w[h, j] applies at lag t - t' = s - 1 - j (w[h, -1] is the current position).
            Non-causal: s must be odd and w[h, j] applies at offset t' - t = j - (s - 1) // 2.
        causal: attend only to t' <= t.
    Returns:
        (B, H, C, T) in the dtype of q. Positions outside the sequence add nothing.
    """
    _check_conv(q, k, v, w, 1)
    s = w.shape[1]
    if not causal and s % 2 == 0:
        raise ValueError(f"w must have an odd kernel size in non-causal mode (centred kernel), got s={s}")
    dtype = _compute_dtype(q, k, v, w)
    T = q.shape[-1]
    chunk = _chunk_size(T)
    reach = min(s - 1 if causal else (s - 1) // 2, T - 1)
    lags = _band_lags(reach, chunk, -(-T // chunk), causal)
    bias = _toeplitz_blocks(w.to(dtype), lags, chunk, causal)
    y = _weighted_average(k.to(dtype).unsqueeze(-1), v.to(dtype).transpose(-1, -2), bias, lags, causal, chunk)
    return (torch.sigmoid(q.to(dtype)) * y.transpose(-1, -2)).to(q.dtype)


def aft_conv2d(q: Tensor, k: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """AFT-conv on image grids (Eq. 6): per-head 2-D kernel bias, one key per head shared by its channels.

    Args:
        q: raw queries (B, H, C, X, Y).
        k: keys (B, H, X, Y), one per head and position.
        v: values (B, H, C, X, Y).
        w: kernels (H, sx, sy), odd sizes, centred: w[h, i, j] applies at offset
            (x' - x, y' - y) = (i - (sx - 1) // 2, j - (sy - 1) // 2), the layout of nn.Conv2d.
    Returns:
        (B, H, C, X, Y) in the dtype of q, laid out channels-last (a view of (B, X, Y, H, C) memory). Positions
        outside the grid add nothing; kernels may be larger than the grid.
    """
    _check_conv(q, k, v, w, 2)
    H, sx, sy = w.shape
    if sx % 2 == 0 or sy % 2 == 0:
        raise ValueError(f"w must have odd kernel sizes (centred kernel), got (sx, sy) = ({sx}, {sy})")
    dtype = _compute_dtype(q, k, v, w)
    B, _, C, X, Y = q.shape
    # channels-last (B, X, Y, H, C): the depth-wise convolution is much faster in that layout
    e = _exp_from_max(k.to(dtype).permute(0, 2, 3, 1), (1, 2)).unsqueeze(-1)  # (B, X, Y, H, 1)
    x = torch.cat([e * v.to(dtype).permute(0, 3, 4, 1, 2), e], dim=-1)  # (B, X, Y, H, C + 1)

    wf = w.to(dtype)
    row_max = wf.amax(dim=(1, 2)).clamp_min(0).detach()  # (H,): weights exp(w - r) and exp(-r) are <= 1
    outside = torch.exp(-row_max).view(H, 1)
    channels = H * (C + 1)
    grid = x.reshape(B, X, Y, channels).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
    total = x.sum(dim=(1, 2), keepdim=True) * outside
    if _holds(wf.amin() >= -_CONV_CANCELLATION_SAFE):
        # global sum plus an (exp(w) - 1) correction: exact to a few ulps while no exp(w) is tiny
        kernel = torch.exp(wf - row_max.view(H, 1, 1)) - outside.view(H, 1, 1)  # (exp(w) - 1) exp(-r)
        local = F.conv2d(grid, kernel.repeat_interleave(C + 1, dim=0).unsqueeze(1), padding=(sx // 2, sy // 2),
                         groups=channels)
        out = local.permute(0, 2, 3, 1).reshape(B, X, Y, H, C + 1) + total
    else:
        # 1 + (exp(w) - 1) would cancel: weigh the kernel box directly and sum what lies outside it without
        # subtraction: whole rows above and below the box, and the box's rows left and right of it
        kernel = torch.exp(wf - row_max.view(H, 1, 1)).repeat_interleave(C + 1, dim=0).unsqueeze(1)
        box = F.conv2d(grid, kernel, padding=(sx // 2, sy // 2), groups=channels)
        rows = grid.sum(dim=3, keepdim=True)
        above = _shift(rows.cumsum(dim=2), 2, sx // 2 + 1)
        below = _shift(rows.flip(2).cumsum(dim=2).flip(2), 2, -(sx // 2 + 1))
        left = _shift(grid.cumsum(dim=3), 3, sy // 2 + 1)
        right = _shift(grid.flip(3).cumsum(dim=3).flip(3), 3, -(sy // 2 + 1))
        beside = F.avg_pool2d(left + right, (sx, 1), stride=1, padding=(sx // 2, 0), count_include_pad=True) * sx
        far = (above + below + beside).permute(0, 2, 3, 1).reshape(B, X, Y, H, C + 1)
        out = box.permute(0, 2, 3, 1).reshape(B, X, Y, H, C + 1) + far * outside
    y = torch.sigmoid(q.to(dtype).permute(0, 3, 4, 1, 2)) * (out[..., :C] / out[..., C:])
    return y.to(q.dtype).permute(0, 3, 4, 1, 2)
