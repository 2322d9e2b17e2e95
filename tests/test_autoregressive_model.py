"""aft_timm.autoregressive models: named configs, causality, recurrent decoding, generation, Hub round trip."""
import json
import math

import pytest
import torch

from aft_timm.autoregressive import Decoder, DecoderConfig, IncrementalDecoder, create_model, list_models, model_config
from aft_timm.autoregressive.decoding import AftStepper, WindowedExpSum



pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(depth=2, dim=32, bias_dim=8, dropout=0.0)
MIXERS = {
    "aft_local": dict(mixer="aft_local", window=5),
    "aft_local_free_bias": dict(mixer="aft_local", window=4, free_bias=True),
    "aft_simple": dict(mixer="aft_simple"),
    "aft_full": dict(mixer="aft_full"),
    "aft_full_free_bias": dict(mixer="aft_full", free_bias=True),
    "aft_conv1d": dict(mixer="aft_conv1d", num_heads=4, kernel_size=3),
    "transformer": dict(mixer="transformer", num_heads=4),
}


def tiny_model(mixer: str, seq_len: int = 24, **kw) -> Decoder:
    torch.manual_seed(0)
    model = create_model("enwik8_aft_local32_l24_d256", seq_len=seq_len, **{**TINY, **MIXERS[mixer], **kw}).eval()
    with torch.no_grad():  # position biases of order 1 (they start near 0), so that the band really matters
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("pos_u", "pos_v", "pos_w", "gamma", "beta"):
                p.normal_()
    return model


def stepwise_logits(model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    decoder = IncrementalDecoder(model, tokens.shape[0])
    inputs = torch.cat([torch.full_like(tokens[:, :1], model.start_token), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        return torch.stack([decoder.step(inputs[:, t]) for t in range(tokens.shape[1])], dim=1)


PAPER_ROWS = {  # name: (depth, dim, mixer, heads, window, bias_dim, seq_len, modality)
    "cifar10_aft_local256_l24_d256": (24, 256, "aft_local", None, 256, 64, 3072, "image"),
    "cifar10_aft_local256_l12_d512": (12, 512, "aft_local", None, 256, 64, 3072, "image"),
    "cifar10_aft_simple_l24_d256": (24, 256, "aft_simple", None, None, None, 3072, "image"),
    "cifar10_transformer_l24_d256": (24, 256, "transformer", 2, None, None, 3072, "image"),
    "cifar10_transformer_l12_d512": (12, 512, "transformer", 4, None, None, 3072, "image"),
    "enwik8_aft_local32_l24_d256": (24, 256, "aft_local", None, 32, 256, 1024, "text"),
    "enwik8_aft_local32_l12_d512": (12, 512, "aft_local", None, 32, 256, 1024, "text"),
    "enwik8_aft_simple_l24_d256": (24, 256, "aft_simple", None, None, None, 1024, "text"),
    "enwik8_transformer_l24_d256": (24, 256, "transformer", 4, None, None, 1024, "text"),
    "enwik8_transformer_l12_d512": (12, 512, "transformer", 8, None, None, 1024, "text"),
}


def test_named_configs_match_the_paper():
    assert list_models() == sorted(PAPER_ROWS)
    for name, (depth, dim, mixer, heads, window, bias_dim, seq_len, modality) in PAPER_ROWS.items():
        cfg = model_config(name)
        assert (cfg.depth, cfg.dim, cfg.mixer, cfg.seq_len, cfg.modality) == (depth, dim, mixer, seq_len, modality)
        assert (cfg.vocab_size, cfg.mlp_ratio, cfg.dropout) == (256, 4.0, 0.1)
        if heads is not None:
            assert cfg.num_heads == heads
        if window is not None:
            assert (cfg.window, cfg.bias_dim) == (window, bias_dim)


def test_model_structure_and_shared_rgb_vocabulary():
    model = create_model("cifar10_aft_local256_l12_d512", depth=2, dim=64)
    block = model.blocks[0]
    assert type(block.mixer).__name__ == "AftLocal" and block.mixer.window == 256 and block.mixer.causal
    assert block.mixer.pos_u.shape == (3072, 64)
    assert block.mlp.fc1.out_features == 4 * 64
    # One embedding row per sub-pixel value (shared by R, G and B) plus the start token; 256-way head.
    assert model.tok_emb.weight.shape == (257, 64) and model.head.out_features == 256
    assert model.pos_emb.shape == (3072, 64)
    attn = create_model("enwik8_transformer_l12_d512", depth=1, dim=64).blocks[0].mixer
    assert type(attn).__name__ == "CausalSelfAttention" and attn.num_heads == 8


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'enwik9_x'.*enwik8_aft_local32_l24_d256"):
        create_model("enwik9_x")
    with pytest.raises(ValueError, match="unknown model argument.*depthh"):
        create_model("enwik8_aft_simple_l24_d256", depthh=2)
    with pytest.raises(ValueError, match="unknown mixer 'aft_fancy'"):
        create_model("enwik8_aft_simple_l24_d256", mixer="aft_fancy")
    with pytest.raises(ValueError, match="3072 tokens"):
        create_model("cifar10_aft_simple_l24_d256", seq_len=1024)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        create_model("enwik8_transformer_l24_d256", dim=30, depth=1)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        create_model("enwik8_aft_simple_l24_d256", depth=0)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_forward_is_causal(mixer):
    model = tiny_model(mixer)
    tokens = torch.randint(0, 256, (2, 20))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # logits[t] predicts token t from tokens < t: positions <= 9 cannot see the change (up to rounding: a stabilizing
    # maximum may be taken over whole blocks), position 10 must.
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-5)
    assert (a[:, 10] - b[:, 10]).abs().max() > 1e-4


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_recurrent_logits_equal_parallel_logits(mixer):
    model = tiny_model(mixer, seq_len=24)
    tokens = torch.randint(0, 256, (3, 24))  # the whole context, many times the AFT-local / conv windows
    with torch.no_grad():
        parallel = model(tokens)
    torch.testing.assert_close(stepwise_logits(model, tokens), parallel, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mixer", ["aft_local", "aft_simple", "aft_conv1d"])
def test_recurrence_is_stable_with_huge_keys(mixer):
    """Keys far beyond 88 overflow a plain exp() in float32; the running max keeps every step finite and exact."""
    model = tiny_model(mixer, seq_len=24)
    with torch.no_grad():
        for block in model.blocks:
            dim = block.mixer.proj.in_features
            keys = block.mixer.qkv.weight[dim : block.mixer.qkv.out_features - dim]
            keys.mul_(500.0)  # keys of standard deviation ~60
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        parallel = model(tokens)
    stepwise = stepwise_logits(model, tokens)
    assert torch.isfinite(stepwise).all()
    torch.testing.assert_close(stepwise, parallel, rtol=1e-4, atol=1e-3)


def test_windowed_exp_sum_against_direct_softmax():
    """Independent reference: softmax over positions <= t of k + bias(t, t') with bias 0 outside the window."""
    torch.manual_seed(1)
    batch, heads, channels, window, steps = 2, 3, 4, 5, 17
    bias_table = torch.randn(heads, steps, steps)
    keys = torch.randn(steps, batch, heads) * 1000  # exp() of these over- and underflows in any float format
    values = torch.randn(steps, batch, heads, channels)
    sums = WindowedExpSum(batch, heads, channels, window, lambda t, pos: bias_table[:, t, pos], torch.device("cpu"))
    for t in range(steps):
        got = sums.step(t, keys[t], values[t])
        offsets = t - torch.arange(t + 1)
        bias = torch.where(offsets < window, bias_table[:, t, : t + 1], torch.zeros(()))  # (H, t+1)
        weights = torch.softmax(keys[: t + 1].permute(1, 2, 0).double() + bias.double(), dim=-1)  # (B, H, t+1)
        expected = torch.einsum("bhn,nbhc->bhc", weights, values[: t + 1].double())
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer", ["aft_local", "aft_simple", "aft_conv1d"])
def test_recurrent_state_does_not_grow(mixer):
    """AFT-simple / local / conv1d decode with a constant-size state: the same tensors at step 500 as at step 20."""
    model = create_model("enwik8_aft_simple_l24_d256", seq_len=3072, **{**TINY, **MIXERS[mixer], "depth": 1}).eval()
    decoder = IncrementalDecoder(model, batch_size=1)
    sizes = []
    tokens = torch.randint(0, 256, (501,))
    with torch.no_grad():
        for t in range(501):
            decoder.step(tokens[t : t + 1])
            if t in (20, 500):
                sizes.append([(tuple(x.shape)) for s in decoder.steppers
                              for x in (s.sums.max, s.sums.num, s.sums.den, s.sums.keys, s.sums.values)])
    assert sizes[0] == sizes[1]
    assert all(isinstance(s, AftStepper) for s in decoder.steppers)


def test_generate_greedy_matches_repeated_parallel_forward():
    model = tiny_model("aft_local", seq_len=16)
    prompt = torch.randint(0, 256, (2, 3))
    out = model.generate(prompt, 9, temperature=0)
    expected = prompt
    with torch.no_grad():
        for _ in range(9):  # independent reference: rerun the whole prefix, take the argmax of the next token
            padded = torch.cat([expected, torch.zeros_like(expected[:, :1])], dim=1)
            nxt = model(padded)[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], dim=1)
    assert out.shape == (2, 12)
    assert torch.equal(out, expected)
    assert torch.equal(model.generate(prompt, 9, top_k=1), expected)  # top-1 sampling is greedy


def test_generate_sampling_is_reproducible_and_respects_top_k():
    model = tiny_model("aft_simple", seq_len=16)
    prompt = torch.zeros(4, 0, dtype=torch.long)
    a = model.generate(prompt, 16, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 16, generator=torch.Generator().manual_seed(3))
    assert a.shape == (4, 16) and torch.equal(a, b)
    allowed = model(a).topk(2, dim=-1).indices  # the two most likely tokens at every position
    c = model.generate(prompt, 16, top_k=2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        top2 = model(c).topk(2, dim=-1).indices
    assert (c[..., None] == top2).any(-1).all()
    assert allowed.shape == (4, 16, 2)
    assert model.training is False


def test_generate_errors_and_restores_training_mode():
    model = tiny_model("aft_local", seq_len=16).train()
    with pytest.raises(ValueError, match=r"= 17 tokens exceeds the model's context of 16"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 13)
    with pytest.raises(ValueError, match=r"\(batch, length\) integer tensor"):
        model.generate(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"token values must lie in \[0, 256\)"):
        model.generate(torch.full((1, 2), 256), 2)
    out = model.generate(torch.zeros(1, 4, dtype=torch.long), 12)  # exactly fills the context
    assert out.shape == (1, 16) and model.training
    decoder = IncrementalDecoder(model.eval(), 1)
    with torch.no_grad():
        for _ in range(16):
            decoder.step(torch.zeros(1, dtype=torch.long))
        with pytest.raises(ValueError, match="cannot decode past the model's context of 16"):
            decoder.step(torch.zeros(1, dtype=torch.long))


def test_forward_errors():
    model = tiny_model("aft_simple", seq_len=16)
    with pytest.raises(ValueError, match="17 tokens exceeds the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, length\) integer tensor, got shape \(2, 3, 4\)"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 3))


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = tiny_model("aft_local", seq_len=16)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["mixer"] == "aft_local" and config["window"] == 5 and config["seq_len"] == 16
    loaded = Decoder.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    # A config that does not match the weights is an error, not a silently half-loaded model.
    config["depth"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="Missing key"):
        Decoder.from_pretrained(tmp_path / "m")


def test_decoder_config_type_is_checked():
    with pytest.raises(TypeError, match="DecoderConfig"):
        Decoder({"mixer": "aft_local"})
    assert math.isclose(DecoderConfig().dropout, 0.1)
