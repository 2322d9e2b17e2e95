"""Token mixers against the literal formula applied to their own projections."""
import pytest
import torch

from aft_timm.layers import AftConv1d, AftConv2d, AftFull, AftLocal, AftSimple, reparameterize_kernel
from aft_timm.ops import aft_simple
from literal_aft import conv1d_bias, conv2d_bias, literal_aft, local_bias, relative_error
from test_ops import LargestTensors, square_in_t


def projections(mixer, x):
    return mixer.qkv(x).split([mixer.dim, mixer.key_dim, mixer.dim], dim=-1)


def literal_mixer(mixer, x, bias, causal):
    q, k, v = projections(mixer, x)
    return mixer.proj(literal_aft(q, k, v, bias, causal).to(x.dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("free_bias", [False, True])
def test_full_and_local_match_literal(causal, free_bias):
    torch.manual_seed(0)
    T, D = 21, 8
    x = torch.randn(2, T, D, dtype=torch.float64)
    for mixer in (AftFull(D, seq_len=30, bias_dim=4, free_bias=free_bias, causal=causal, dtype=torch.float64),
                  AftLocal(D, seq_len=30, window=5, bias_dim=4, free_bias=free_bias, causal=causal,
                           dtype=torch.float64)):
        with torch.no_grad():  # a visible bias, so that a wrong bias cannot pass
            for p in (mixer.pos_u, mixer.pos_v, mixer.pos_w):
                if p is not None:
                    p.normal_(std=1.0)
        dense = mixer.pos_w if free_bias else mixer.pos_u @ mixer.pos_v.T
        dense = dense[:T, :T]
        if isinstance(mixer, AftLocal):
            dense = local_bias(dense, 5)
        assert relative_error(mixer(x), literal_mixer(mixer, x, dense, causal)) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_simple_matches_literal(causal):
    x = torch.randn(3, 17, 6, dtype=torch.float64)
    mixer = AftSimple(6, causal=causal, dtype=torch.float64)
    assert relative_error(mixer(x), literal_mixer(mixer, x, torch.zeros(17, 17), causal)) < 1e-10


def conv_literal(mixer, x, kernel_bias):
    """Literal AFT-conv: per head, the head's key shared by its channels, the kernel as a dense bias."""
    q, k, v = projections(mixer, x.flatten(1, -2))
    heads, c = mixer.num_heads, mixer.head_dim
    out = []
    for h in range(heads):
        keys = k[..., h:h + 1].expand(-1, -1, c)
        out.append(literal_aft(q[..., h * c:(h + 1) * c], keys, v[..., h * c:(h + 1) * c], kernel_bias(h),
                               getattr(mixer, "causal", False)))
    return mixer.proj(torch.cat(out, dim=-1).to(x.dtype)).view(x.shape)


@pytest.mark.parametrize("causal", [False, True])
def test_conv1d_matches_literal(causal):
    torch.manual_seed(1)
    mixer = AftConv1d(12, num_heads=3, kernel_size=5, causal=causal, dtype=torch.float64)
    with torch.no_grad():
        mixer.gamma.normal_()
        mixer.beta.normal_()
    x = torch.randn(2, 19, 12, dtype=torch.float64)
    kernel = mixer.kernel()
    expected = conv_literal(mixer, x, lambda h: conv1d_bias(kernel[h], 19, causal))
    assert relative_error(mixer(x), expected) < 1e-10


def test_conv2d_matches_literal():
    torch.manual_seed(2)
    mixer = AftConv2d(8, num_heads=2, kernel_size=3, dtype=torch.float64)
    with torch.no_grad():
        mixer.gamma.normal_()
        mixer.beta.normal_()
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    kernel = mixer.kernel()
    assert relative_error(mixer(x), conv_literal(mixer, x, lambda h: conv2d_bias(kernel[h], 4, 5))) < 1e-10


def test_kernel_reparameterization():
    w = torch.randn(3, 4, 5, dtype=torch.float64)
    gamma, beta = torch.randn(2, 3, dtype=torch.float64)
    flat = w.flatten(1)
    expected = gamma[:, None] * (flat - flat.mean(1, keepdim=True)) / flat.std(1, unbiased=False, keepdim=True)
    expected = (expected + beta[:, None]).view_as(w)
    assert torch.allclose(reparameterize_kernel(w, gamma, beta), expected, atol=1e-4)


def test_conv_mixers_start_as_aft_simple():
    """gamma = beta = 0 at initialization: exp(w) - 1 = 0 and the layer is AFT-simple with per-head keys."""
    torch.manual_seed(3)
    for mixer, x, causal in ((AftConv2d(8, 2, 5), torch.randn(2, 6, 7, 8), False),
                             (AftConv1d(8, 2, 9), torch.randn(2, 11, 8), True)):
        assert torch.count_nonzero(mixer.kernel()) == 0
        q, k, v = projections(mixer, x.flatten(1, -2))
        keys = k.repeat_interleave(mixer.head_dim, dim=-1)
        expected = mixer.proj(aft_simple(q, keys, v, causal=causal)).view(x.shape)
        assert torch.allclose(mixer(x), expected, atol=1e-6)


def test_parameters_registered_train_and_follow_to():
    torch.manual_seed(4)
    mixers = [AftFull(8, 10), AftLocal(8, 10, 3, causal=True), AftSimple(8), AftConv1d(8, 2, 3), AftConv2d(8, 2, 3)]
    inputs = [torch.randn(2, 10, 8)] * 4 + [torch.randn(2, 3, 4, 8)]
    for mixer, x in zip(mixers, inputs):
        names = {n for n, _ in mixer.named_parameters()}
        if isinstance(mixer, (AftFull, AftLocal)):
            assert {"pos_u", "pos_v"} <= names
        if isinstance(mixer, (AftConv1d, AftConv2d)):
            assert {"weight", "gamma", "beta"} <= names
            with torch.no_grad():
                mixer.gamma.fill_(1.0)
        mixer(x).square().sum().backward()
        for name, p in mixer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        before = mixer(x)
        mixer.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in mixer.parameters())
        assert mixer(x.double()).dtype == torch.float64
        assert torch.allclose(mixer(x.double()).float(), before, atol=1e-5)


def test_device_and_dtype_arguments():
    for mixer in (AftFull(8, 10, device="meta"), AftLocal(8, 10, 2, device="meta", dtype=torch.bfloat16),
                  AftConv2d(8, 2, 3, device="meta"), AftSimple(8, dtype=torch.float64)):
        for p in mixer.parameters():
            assert p.device.type == ("cpu" if isinstance(mixer, AftSimple) else "meta")
    assert AftLocal(8, 10, 2, dtype=torch.bfloat16).pos_u.dtype == torch.bfloat16


def test_local_builds_only_the_band_of_the_factorized_bias():
    T = 1500
    mixer = AftLocal(8, seq_len=T, window=8, bias_dim=16, causal=True)
    with LargestTensors() as seen:
        mixer(torch.randn(1, T, 8)).sum().backward()
    assert square_in_t(seen.shapes, T) == []


def test_shorter_sequences_use_leading_positions():
    mixer = AftLocal(8, seq_len=16, window=4, causal=True)
    x = torch.randn(1, 16, 8)
    assert torch.allclose(mixer(x[:, :9]), mixer(x)[:, :9], atol=1e-6)  # causal: a prefix sees only itself


def test_mixer_errors():
    with pytest.raises(ValueError, match=r"D=8 channels, got shape \[2, 5, 6\]"):
        AftSimple(8)(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"seq_len=4 positions, got T=5"):
        AftFull(8, 4)(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match=r"dim=10 must be divisible by num_heads=4"):
        AftConv2d(10, 4, 3)
    with pytest.raises(ValueError, match=r"kernel_size must be odd"):
        AftConv2d(8, 2, 4)
    with pytest.raises(ValueError, match=r"window must be an int >= 1"):
        AftLocal(8, 10, 0)
    with pytest.raises(ValueError, match=r"channels-last grid \(B, X, Y, D\)"):
        AftConv2d(8, 2, 3)(torch.randn(2, 5, 8))


def test_torchscript_matches_eager():
    torch.manual_seed(5)
    for mixer, x in ((AftFull(8, 6), torch.randn(2, 6, 8)), (AftConv2d(8, 2, 3), torch.randn(2, 3, 4, 8)),
                     (AftLocal(8, 6, 2, causal=True), torch.randn(2, 6, 8))):
        scripted = torch.jit.script(mixer)
        assert torch.allclose(scripted(x), mixer(x))
