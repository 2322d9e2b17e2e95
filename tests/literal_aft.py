"""A literal float64 evaluation of the AFT formula, independent of aft_timm.ops: explicit sums over t'.

    y[t, c] = sigmoid(q[t, c]) * sum_{t' in S(t)} exp(k[t', c] + b[t, t']) v[t', c] / sum_{t' in S(t)} exp(k[t', c] + b[t, t'])
"""
import torch


def literal_aft(q, k, v, bias, causal=False):
    """q, k, v: (B, T, D); bias: (T, T), the effective b(t, t') (0 where the variant has no bias)."""
    q, k, v, bias = (x.double() for x in (q, k, v, bias))
    B, T, D = q.shape
    out = torch.empty(B, T, D, dtype=torch.float64)
    for t in range(T):
        visible = range(t + 1) if causal else range(T)
        logits = torch.stack([k[:, s] + bias[t, s] for s in visible], dim=1)  # (B, |S(t)|, D)
        # shift by the max only to evaluate exp in range; the formula itself is unchanged
        weights = torch.exp(logits - logits.amax(dim=1, keepdim=True))
        values = torch.stack([v[:, s] for s in visible], dim=1)
        out[:, t] = torch.sigmoid(q[:, t]) * (weights * values).sum(1) / weights.sum(1)
    return out


def local_bias(w, window):
    """w where |t - t'| < window, 0 elsewhere (Eq. 4)."""
    T = w.shape[0]
    pos = torch.arange(T)
    return torch.where((pos[:, None] - pos[None, :]).abs() < window, w.double(), torch.zeros((), dtype=torch.float64))


def conv1d_bias(kernel, T, causal):
    """(T, T) bias of a 1-D kernel (s,): causal lag t - t' = s - 1 - j, else centred offset t' - t = j - (s - 1) // 2."""
    s = kernel.shape[0]
    bias = torch.zeros(T, T, dtype=torch.float64)
    for t in range(T):
        for u in range(T):
            j = (u - t) + (s - 1 if causal else (s - 1) // 2)
            if 0 <= j < s:
                bias[t, u] = kernel[j]
    return bias


def conv2d_bias(kernel, X, Y):
    """(XY, XY) bias of a centred 2-D kernel (sx, sy) on a raster-ordered X x Y grid."""
    sx, sy = kernel.shape
    n = X * Y
    bias = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            i = b // Y - a // Y + (sx - 1) // 2
            j = b % Y - a % Y + (sy - 1) // 2
            if 0 <= i < sx and 0 <= j < sy:
                bias[a, b] = kernel[i, j]
    return bias


def literal_conv1d(q, k, v, w, causal):
    """q, v: (B, H, C, T); k: (B, H, T); w: (H, s)."""
    B, H, C, T = q.shape
    out = torch.empty(B, H, C, T, dtype=torch.float64)
    for h in range(H):
        keys = k[:, h, :, None].expand(B, T, C)
        out[:, h] = literal_aft(q[:, h].transpose(1, 2), keys, v[:, h].transpose(1, 2),
                                conv1d_bias(w[h], T, causal), causal).transpose(1, 2)
    return out


def literal_conv2d(q, k, v, w):
    """q, v: (B, H, C, X, Y); k: (B, H, X, Y); w: (H, sx, sy)."""
    B, H, C, X, Y = q.shape
    out = torch.empty(B, H, C, X, Y, dtype=torch.float64)
    for h in range(H):
        keys = k[:, h].reshape(B, X * Y, 1).expand(B, X * Y, C)
        y = literal_aft(q[:, h].reshape(B, C, X * Y).transpose(1, 2), keys, v[:, h].reshape(B, C, X * Y).transpose(1, 2),
                        conv2d_bias(w[h], X, Y))
        out[:, h] = y.transpose(1, 2).reshape(B, C, X, Y)
    return out


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()
