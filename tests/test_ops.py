"""aft_timm.ops against the literal formula: exactness, stability, dtypes, gradients, memory and errors."""
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aft_timm import ops
from aft_timm.ops import aft_conv1d, aft_conv2d, aft_full, aft_local, aft_simple
from literal_aft import (conv1d_bias, literal_aft, literal_conv1d, literal_conv2d, local_bias, relative_error)


@pytest.fixture(params=[64, 4], ids=["chunk64", "chunk4"])
def chunk(request, monkeypatch):
    """Run with the default chunk size and with tiny chunks, so small T exercises the multi-chunk paths."""
    monkeypatch.setattr(ops, "_BASE_CHUNK", request.param)
    return request.param


def qkv(B, T, D, dtype=torch.float64, key_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    return q.to(dtype), (k * key_scale).to(dtype), v.to(dtype)


SHAPES = [(1, 1, 1), (2, 1, 3), (1, 7, 2), (3, 13, 4), (2, 65, 3), (1, 130, 2)]


@pytest.mark.parametrize("B,T,D", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_full_and_simple_exact_float64(chunk, B, T, D, causal):
    q, k, v = qkv(B, T, D)
    w = torch.randn(T, T, dtype=torch.float64)
    u, vf = torch.randn(2, T, 5, dtype=torch.float64)
    assert relative_error(aft_full(q, k, v, w, causal), literal_aft(q, k, v, w, causal)) < 1e-10
    assert relative_error(aft_full(q, k, v, (u, vf), causal), literal_aft(q, k, v, u @ vf.T, causal)) < 1e-10
    zero = torch.zeros(T, T, dtype=torch.float64)
    assert relative_error(aft_simple(q, k, v, causal), literal_aft(q, k, v, zero, causal)) < 1e-10


@pytest.mark.parametrize("B,T,D", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_of", [lambda T: 1, lambda T: 2, lambda T: 5, lambda T: T, lambda T: T + 3],
                         ids=["w1", "w2", "w5", "wT", "wT+3"])
def test_local_exact_float64(chunk, B, T, D, causal, window_of):
    window = window_of(T)
    q, k, v = qkv(B, T, D, seed=1)
    w = torch.randn(T, T, dtype=torch.float64)
    u, vf = torch.randn(2, T, 3, dtype=torch.float64)
    expected = literal_aft(q, k, v, local_bias(w, window), causal)
    assert relative_error(aft_local(q, k, v, w, window, causal), expected) < 1e-10
    expected = literal_aft(q, k, v, local_bias(u @ vf.T, window), causal)
    assert relative_error(aft_local(q, k, v, (u, vf), window, causal), expected) < 1e-10


def test_local_differs_from_minus_infinity_outside_window():
    """Eq. 4 keeps global connectivity: keys outside the window still count with weight exp(k)."""
    q, k, v = qkv(1, 20, 3)
    w = torch.randn(20, 20, dtype=torch.float64)
    ours = aft_local(q, k, v, w, 3)
    pos = torch.arange(20)
    masked = torch.where((pos[:, None] - pos).abs() < 3, w, torch.full_like(w, float("-inf")))
    assert relative_error(ours, literal_aft(q, k, v, local_bias(w, 3))) < 1e-10
    assert relative_error(ours, literal_aft(q, k, v, masked)) > 1e-3


@pytest.mark.parametrize("T,s,causal", [(1, 1, True), (1, 3, False), (9, 1, True), (9, 4, True), (9, 5, False),
                                        (23, 7, True), (23, 7, False), (12, 31, True), (12, 31, False),
                                        (70, 11, True), (70, 11, False)])
def test_conv1d_exact_float64(chunk, T, s, causal):
    B, H, C = 2, 3, 2
    g = torch.Generator().manual_seed(T * s)
    q, v = torch.randn(2, B, H, C, T, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, T, generator=g, dtype=torch.float64)
    w = torch.randn(H, s, generator=g, dtype=torch.float64)
    assert relative_error(aft_conv1d(q, k, v, w, causal), literal_conv1d(q, k, v, w, causal)) < 1e-10


def test_conv1d_causal_kernel_layout():
    """w[h, -1] is the current position: a kernel that only boosts it matches AFT with bias on the diagonal."""
    T = 6
    q, k, v = qkv(1, T, 1)
    w = torch.zeros(1, 3, dtype=torch.float64)
    w[0, -1] = 5.0
    out = aft_conv1d(q.view(1, 1, 1, T), k.view(1, 1, T), v.view(1, 1, 1, T), w, causal=True)
    diagonal = torch.eye(T, dtype=torch.float64) * 5.0
    assert relative_error(out.view(1, T, 1), literal_aft(q, k, v, diagonal, causal=True)) < 1e-12
    assert torch.equal(conv1d_bias(w[0], T, True), diagonal)


@pytest.mark.parametrize("X,Y,sx,sy", [(1, 1, 3, 3), (1, 5, 3, 1), (3, 4, 5, 3), (4, 4, 11, 11), (6, 5, 3, 5)])
@pytest.mark.parametrize("kernel", ["moderate", "very_negative"])
def test_conv2d_exact_float64(X, Y, sx, sy, kernel):
    """Both evaluation paths: moderate kernels (global sum + correction) and kernels with exp(w) ~ 0."""
    B, H, C = 2, 3, 2
    g = torch.Generator().manual_seed(X * 100 + Y)
    q, v = torch.randn(2, B, H, C, X, Y, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, X, Y, generator=g, dtype=torch.float64)
    w = torch.rand(H, sx, sy, generator=g, dtype=torch.float64) * 4 - 2
    if kernel == "very_negative":
        w[:, 0, -1] = -12.0
    assert relative_error(aft_conv2d(q, k, v, w), literal_conv2d(q, k, v, w)) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_float32_matches_literal(chunk, causal):
    q, k, v = qkv(3, 57, 8, dtype=torch.float32, seed=3)
    w = torch.randn(57, 57)
    for out, bias in [(aft_full(q, k, v, w, causal), w), (aft_local(q, k, v, w, 9, causal), local_bias(w, 9)),
                      (aft_simple(q, k, v, causal), torch.zeros(57, 57))]:
        assert out.dtype == torch.float32
        assert relative_error(out, literal_aft(q, k, v, bias, causal)) < 1e-5


def test_conv_float32_matches_literal():
    g = torch.Generator().manual_seed(7)
    q, v = torch.randn(2, 2, 4, 3, 9, 10, generator=g)
    k = torch.randn(2, 4, 9, 10, generator=g) * 3
    w = torch.rand(4, 7, 5, generator=g) * 6 - 3  # down to the fast path's limit, exp(w) = 0.05
    assert relative_error(aft_conv2d(q, k, v, w), literal_conv2d(q, k, v, w)) < 1e-5
    q1, v1 = torch.randn(2, 2, 4, 3, 40, generator=g)
    k1 = torch.randn(2, 4, 40, generator=g) * 3
    w1 = torch.randn(4, 9, generator=g) * 3
    for causal in (False, True):
        assert relative_error(aft_conv1d(q1, k1, v1, w1, causal), literal_conv1d(q1, k1, v1, w1, causal)) < 1e-5


def extreme_keys(B, T, D, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    if pattern == "uniform":
        return (torch.rand(B, T, D, generator=g) * 2 - 1) * 80
    if pattern == "rising":  # every later key dwarfs the earlier ones
        return torch.linspace(-80, 80, T).view(1, T, 1).expand(B, T, D).contiguous()
    keys = torch.full((B, T, D), -80.0)  # "jumps": early keys tiny, then huge, tiny again, a lone huge one
    keys[:, T // 8:] = 80.0
    keys[:, T // 2:] = -80.0
    keys[:, -2] = 80.0
    return keys


@pytest.mark.parametrize("pattern", ["uniform", "rising", "jumps"])
@pytest.mark.parametrize("causal", [False, True])
def test_stable_with_extreme_keys_and_biases(chunk, pattern, causal):
    B, T, D = 2, 96, 3
    q, _, v = qkv(B, T, D, dtype=torch.float32, seed=4)
    k = extreme_keys(B, T, D, pattern)
    g = torch.Generator().manual_seed(5)
    w = (torch.rand(T, T, generator=g) * 2 - 1) * 30
    if pattern == "jumps":  # huge keys under the most negative bias: exp(w) - 1 must not cancel to 0
        w[:, T // 8:] = -30.0
    cases = [("full", aft_full(q, k, v, w, causal), w), ("simple", aft_simple(q, k, v, causal), torch.zeros(T, T))]
    for window in (1, 7, 40):
        cases.append((f"local{window}", aft_local(q, k, v, w, window, causal), local_bias(w, window)))
    for name, out, bias in cases:
        assert torch.isfinite(out).all(), name
        assert relative_error(out, literal_aft(q, k, v, bias, causal)) < 1e-4, name


def test_causal_early_positions_not_swamped_by_later_keys(chunk):
    """Positions before a huge key must still see their own keys (no 0/0, no underflow to the global part)."""
    T = 40
    q, _, v = qkv(1, T, 2, dtype=torch.float32)
    k = torch.full((1, T, 2), -80.0)
    k[:, 3] = -75.0
    k[:, 20:] = 85.0
    w = torch.zeros(T, T)
    w[:, :3] = 20.0
    out = aft_local(q, k, v, w, 5, causal=True)
    expected = literal_aft(q, k, v, local_bias(w, 5), causal=True)
    assert torch.isfinite(out).all()
    assert relative_error(out[:, :20], expected[:, :20]) < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_causal_exact_for_any_key_spread(chunk, seed):
    """Keys hundreds apart (beyond even float64's exp range): every row still matches the literal formula."""
    B, T, D = 2, 50, 3
    q, _, v = qkv(B, T, D, dtype=torch.float32, seed=seed)
    k = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed)) * 500
    w = torch.randn(T, T)
    zero = torch.zeros(T, T)
    for out, bias in [(aft_simple(q, k, v, True), zero), (aft_local(q, k, v, w, 9, True), local_bias(w, 9)),
                      (aft_full(q, k, v, w, True), w)]:
        assert torch.isfinite(out).all()
        assert relative_error(out, literal_aft(q, k, v, bias, True)) < 1e-5
    two = aft_simple(torch.zeros(1, 2, 1), torch.tensor([[[-1089.0], [284.0]]]), torch.ones(1, 2, 1), causal=True)
    assert torch.equal(two, torch.full((1, 2, 1), 0.5))


@pytest.mark.parametrize("causal", [False, True])
def test_conv_stable_with_extreme_keys_and_biases(causal):
    B, H, C, T = 2, 2, 3, 60
    g = torch.Generator().manual_seed(6)
    q, v = torch.randn(2, B, H, C, T, generator=g)
    k = (torch.rand(B, H, T, generator=g) * 2 - 1) * 80
    w = (torch.rand(H, 11, generator=g) * 2 - 1) * 30
    out = aft_conv1d(q, k, v, w, causal)
    assert torch.isfinite(out).all()
    assert relative_error(out, literal_conv1d(q, k, v, w, causal)) < 1e-4
    if causal:
        return
    q2, v2 = torch.randn(2, B, H, C, 7, 6, generator=g)
    k2 = torch.full((B, H, 7, 6), -80.0)
    k2[..., 3, 3] = 80.0
    w2 = torch.full((H, 5, 5), 30.0)
    w2[:, 2, 3] = -30.0  # the dominant key sits under the most negative weight for its left neighbour
    out = aft_conv2d(q2, k2, v2, w2)
    assert torch.isfinite(out).all()
    assert relative_error(out, literal_conv2d(q2, k2, v2, w2)) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs(dtype, tol):
    q, k, v = qkv(2, 33, 4, dtype=dtype)
    w = torch.randn(33, 33).to(dtype)
    for causal in (False, True):
        out = aft_local(q, k, v, w, 6, causal)
        assert out.dtype == dtype
        assert relative_error(out, literal_aft(q, k, v, local_bias(w, 6), causal)) < tol
    q, k, v = qkv(2, 33, 4, dtype=dtype, key_scale=8.0)  # keys whose exp overflows float16
    out = aft_simple(q, k, v, causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, literal_aft(q, k, v, torch.zeros(33, 33), True)) < tol
    qc, vc = torch.randn(2, 1, 2, 3, 5, 5).to(dtype)
    out = aft_conv2d(qc, torch.randn(1, 2, 5, 5).to(dtype), vc, torch.randn(2, 3, 3).to(dtype))
    assert out.dtype == dtype


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(monkeypatch, causal):
    monkeypatch.setattr(ops, "_BASE_CHUNK", 3)  # several chunks, so every path of the engine is differentiated
    B, T, D = 2, 8, 2
    q, k, v = (x.requires_grad_() for x in qkv(B, T, D))
    w = torch.randn(T, T, dtype=torch.float64, requires_grad=True)
    u, vf = (x.requires_grad_() for x in torch.randn(2, T, 2, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *a: aft_full(*a, causal=causal), (q, k, v, w))
    assert torch.autograd.gradcheck(lambda q, k, v, w: aft_local(q, k, v, w, 4, causal), (q, k, v, w))
    assert torch.autograd.gradcheck(lambda q, k, v, u, vf: aft_local(q, k, v, (u, vf), 3, causal), (q, k, v, u, vf))
    assert torch.autograd.gradcheck(lambda *a: aft_simple(*a, causal=causal), (q, k, v))
    qc, vc = (x.requires_grad_() for x in torch.randn(2, 1, 2, 2, T, dtype=torch.float64))
    kc = torch.randn(1, 2, T, dtype=torch.float64, requires_grad=True)
    wc = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: aft_conv1d(*a, causal=causal), (qc, kc, vc, wc))
    if not causal:
        q2, v2 = (x.requires_grad_() for x in torch.randn(2, 1, 2, 2, 4, 3, dtype=torch.float64))
        k2 = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
        w2 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(aft_conv2d, (q2, k2, v2, w2))


class LargestTensors(TorchDispatchMode):
    """Records the shape of every tensor an aten op produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def square_in_t(shapes, T):
    return [s for s in shapes if sum(d >= T for d in s) >= 2]


def test_local_causal_long_sequence_memory_is_linear():
    """B=1, T=16384, D=256, window=256: forward and backward never hold anything of size T x T."""
    B, T, D, window = 1, 16384, 256, 256
    q, k, v = (torch.randn(B, T, D, requires_grad=True) for _ in range(3))
    u, vf = (torch.randn(T, 64).mul_(0.1).requires_grad_() for _ in range(2))
    with LargestTensors() as seen:
        out = aft_local(q, k, v, (u, vf), window, causal=True)
        out.square().sum().backward()
    assert square_in_t(seen.shapes, T) == []
    largest = max(torch.Size(s).numel() for s in seen.shapes)
    assert largest < 8 * T * D, largest  # O(T * (window + D)), far below T * T
    assert torch.isfinite(q.grad).all() and torch.isfinite(u.grad).all()


def test_memory_monitor_sees_dense_bias():
    """Positive control for the test above: aft_full really holds exp(w), T x T, and the monitor sees it."""
    T = 300
    q, k, v = qkv(2, T, 4, dtype=torch.float32)
    w = torch.randn(T, T)
    with LargestTensors() as seen:
        aft_full(q, k, v, w)
    assert (T, T) in square_in_t(seen.shapes, T)
    # ... but never with a batch dimension
    assert all(torch.Size(s).numel() <= T * T for s in square_in_t(seen.shapes, T))


@pytest.mark.parametrize("causal", [False, True])
def test_simple_local_conv_memory_never_square(causal):
    T = 700
    q, k, v = (x.requires_grad_() for x in qkv(2, T, 8, dtype=torch.float32))
    u, vf = (torch.randn(T, 4).requires_grad_() for _ in range(2))
    qc, vc = torch.randn(2, 2, 2, 4, T, requires_grad=True)
    kc = torch.randn(2, 2, T, requires_grad=True)
    with LargestTensors() as seen:
        (aft_simple(q, k, v, causal).sum() + aft_local(q, k, v, (u, vf), 16, causal).sum()
         + aft_conv1d(qc, kc, vc, torch.randn(2, 7), causal).sum()).backward()
    assert square_in_t(seen.shapes, T) == []


@pytest.mark.parametrize("call,message", [
    (lambda q, k, v, w: aft_full(q, k[:, :3], v, w), r"k must have shape \(2, 5, 4\)"),
    (lambda q, k, v, w: aft_full(q[0], k, v, w), r"q must have shape \(B, T, D\)"),
    (lambda q, k, v, w: aft_full(q, k, v, w[:4]), r"w must have shape \(5, 5\)"),
    (lambda q, k, v, w: aft_full(q, k, v, (w, w[:, :2])), r"w factors must both have shape \(5, d'\)"),
    (lambda q, k, v, w: aft_local(q, k, v, w, 0), r"window must be >= 1"),
    (lambda q, k, v, w: aft_local(q, k, v, w, 2.5), r"window must be an int"),
    (lambda q, k, v, w: aft_simple(q, k, v.int()), r"v must be a floating-point tensor"),
    (lambda q, k, v, w: aft_simple(q, k, "v"), r"v must be a torch.Tensor"),
])
def test_invalid_arguments(call, message):
    q, k, v = qkv(2, 5, 4, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        call(q, k, v, torch.randn(5, 5))


def test_invalid_conv_arguments():
    q = torch.randn(2, 3, 4, 9)
    k = torch.randn(2, 3, 9)
    with pytest.raises(ValueError, match=r"odd kernel size in non-causal mode"):
        aft_conv1d(q, k, q, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"w must have shape \(H, s\) with H=3 heads"):
        aft_conv1d(q, k, q, torch.randn(2, 3), causal=True)
    with pytest.raises(ValueError, match=r"k must have shape \(2, 3, 9\)"):
        aft_conv1d(q, torch.randn(2, 3, 4, 9), q, torch.randn(3, 3))
    q2 = torch.randn(2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match=r"odd kernel sizes"):
        aft_conv2d(q2, torch.randn(2, 3, 5, 6), q2, torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match=r"v must have shape \(2, 3, 4, 5, 6\)"):
        aft_conv2d(q2, torch.randn(2, 3, 5, 6), q2[:, :, :2], torch.randn(3, 3, 3))
