"""Decoder-only autoregressive models (iGPT / GPT-2 style pre-LN skeleton) with AFT or attention token mixers.

A model reads a sequence of tokens and predicts every one of them from the tokens before it: the input is shifted
right by one behind a learned start token, so `model(tokens)[:, t]` is the distribution of `tokens[:, t]` given
`tokens[:, :t]` and every token of a sequence (the first one included) is scored.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..layers import AftConv1d, AftFull, AftLocal, AftSimple
from .attention import CausalSelfAttention
from .decoding import generate

MIXERS = ("aft_local", "aft_simple", "aft_full", "aft_conv1d", "transformer")
MODALITIES = ("text", "image")
IMAGE_SHAPE = (32, 32, 3)  # CIFAR10, height x width x channels; tokens are sub-pixels in raster order (HWC)


@dataclass
class DecoderConfig:
    """Architecture of a `Decoder`.

    Args:
        mixer: Token mixer, one of `MIXERS`.
        modality: "text" (a byte stream) or "image" (a 32x32x3 image as 3072 sub-pixel tokens in raster order, the
            R, G, B values of a pixel adjacent).
        vocab_size: Number of token values (256 for bytes and 8-bit sub-pixels). Token `vocab_size` is the start token.
        seq_len: Maximum context: the length of the learned position embedding and of the AFT position bias.
        depth: Number of blocks.
        dim: Model width.
        mlp_ratio: Hidden width of the MLP relative to `dim`.
        dropout: Dropout on the embeddings, the mixer and MLP outputs (and attention probabilities).
        window: AFT-local window s: position bias only where t - t' < s.
        bias_dim: Rank d' of the factorized position bias u v^T of AFT-local and AFT-full.
        free_bias: AFT-local / AFT-full: a free seq_len x seq_len bias instead of the factorized one.
        num_heads: Attention heads (transformer) or AFT-conv1d heads.
        kernel_size: AFT-conv1d kernel size (the causal window of its relative position bias).
    """

    mixer: str = "aft_local"
    modality: str = "text"
    vocab_size: int = 256
    seq_len: int = 1024
    depth: int = 12
    dim: int = 512
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    window: int = 32
    bias_dim: int = 256
    free_bias: bool = False
    num_heads: int = 8
    kernel_size: int = 32

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r}; choose one of {', '.join(MIXERS)}")
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; choose one of {', '.join(MODALITIES)}")
        for name in ("vocab_size", "seq_len", "depth", "dim", "window", "bias_dim", "num_heads", "kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.mixer in ("transformer", "aft_conv1d") and self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads} for {self.mixer}")
        if self.modality == "image":
            if self.seq_len != math.prod(IMAGE_SHAPE) or self.vocab_size != 256:
                raise ValueError(
                    f"image models see a {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]} image as "
                    f"{math.prod(IMAGE_SHAPE)} tokens of 256 values; got seq_len={self.seq_len}, "
                    f"vocab_size={self.vocab_size}"
                )


def _build_mixer(cfg: DecoderConfig) -> nn.Module:
    if cfg.mixer == "aft_local":
        return AftLocal(cfg.dim, cfg.seq_len, cfg.window, bias_dim=cfg.bias_dim, free_bias=cfg.free_bias,
                        causal=True, proj_drop=cfg.dropout)
    if cfg.mixer == "aft_full":
        return AftFull(cfg.dim, cfg.seq_len, bias_dim=cfg.bias_dim, free_bias=cfg.free_bias, causal=True,
                       proj_drop=cfg.dropout)
    if cfg.mixer == "aft_simple":
        return AftSimple(cfg.dim, causal=True, proj_drop=cfg.dropout)
    if cfg.mixer == "aft_conv1d":
        return AftConv1d(cfg.dim, cfg.num_heads, cfg.kernel_size, causal=True, proj_drop=cfg.dropout)
    return CausalSelfAttention(cfg.dim, cfg.num_heads, attn_drop=cfg.dropout, proj_drop=cfg.dropout)


class Mlp(nn.Module):
    """Two-layer GELU MLP with dropout on its output."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN residual block: x + mixer(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.mixer = _build_mixer(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, round(cfg.dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Decoder(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="aft-timm",
    tags=["aft", "attention-free-transformer", "autoregressive"],
    repo_url="https://arxiv.org/abs/2105.14103",
):
    """Autoregressive decoder over `config.vocab_size` token values.

    Saves and loads as `config.json` + `model.safetensors` (`save_pretrained`, `from_pretrained`, `push_to_hub`).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size + 1, config.dim)  # + the start token
        self.pos_emb = nn.Parameter(torch.zeros(config.seq_len, config.dim))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._init_weights()

    @property
    def start_token(self) -> int:
        return self.config.vocab_size

    def _init_weights(self) -> None:
        # GPT-2 initialization; the mixers' own position-bias parameters keep the initialization of aft_timm.layers.
        residual_std = 0.02 / math.sqrt(2 * self.config.depth)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith("mixer.proj") or name.endswith("mlp.fc2")
                nn.init.normal_(module.weight, std=residual_std if is_residual_out else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raises ValueError unless `tokens` is a (batch, length) integer tensor of valid token values."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
            raise ValueError(f"tokens must be a (batch, length) integer tensor, got shape {tuple(tokens.shape)} "
                             f"of {tokens.dtype}")
        if tokens.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds the model's context of "
                             f"{self.config.seq_len} (seq_len)")
        if tokens.numel():
            low, high = torch.stack(torch.aminmax(tokens)).tolist()  # one device sync
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"token values must lie in [0, {self.config.vocab_size}), got values from {low} "
                                 f"to {high}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits.

        Args:
            tokens: (B, T) token values in [0, vocab_size), T <= seq_len.

        Returns:
            (B, T, vocab_size) logits; position t predicts tokens[:, t] from tokens[:, :t].
        """
        self.check_tokens(tokens)
        tokens = tokens.long()
        start = tokens.new_full((tokens.shape[0], 1), self.start_token)
        inputs = torch.cat([start, tokens[:, :-1]], dim=1)
        x = self.drop(self.tok_emb(inputs) + self.pos_emb[: tokens.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Samples a continuation of `prompt` token by token (recurrent state or cache, never re-reading the prefix).

        Args:
            prompt: (B, P) tokens, P >= 0 (a (B, 0) prompt samples from scratch).
            max_new_tokens: Number of tokens to sample; P + max_new_tokens must not exceed seq_len.
            temperature: Softmax temperature; 0 picks the most likely token.
            top_k: Sample only among the k most likely tokens.
            generator: Random generator for reproducible samples.

        Returns:
            (B, P + max_new_tokens) tokens, the prompt first.
        """
        return generate(self, prompt, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs) -> "Decoder":
        # huggingface_hub loads non-strictly by default; a checkpoint that does not match its config is an error here.
        return super()._from_pretrained(strict=strict, **kwargs)


_CIFAR10 = dict(modality="image", seq_len=3072, vocab_size=256)
_ENWIK8 = dict(modality="text", seq_len=1024, vocab_size=256)
_MODEL_CONFIGS: dict[str, dict] = {
    # CIFAR10 (paper Table 2); AFT-local with d' = 64.
    "cifar10_aft_local256_l24_d256": dict(_CIFAR10, mixer="aft_local", window=256, bias_dim=64, depth=24, dim=256),
    "cifar10_aft_local256_l12_d512": dict(_CIFAR10, mixer="aft_local", window=256, bias_dim=64, depth=12, dim=512),
    "cifar10_aft_simple_l24_d256": dict(_CIFAR10, mixer="aft_simple", depth=24, dim=256),
    "cifar10_transformer_l24_d256": dict(_CIFAR10, mixer="transformer", num_heads=2, depth=24, dim=256),
    "cifar10_transformer_l12_d512": dict(_CIFAR10, mixer="transformer", num_heads=4, depth=12, dim=512),
    # Enwik8 (paper Table 4); AFT-local with d' = 256.
    "enwik8_aft_local32_l24_d256": dict(_ENWIK8, mixer="aft_local", window=32, bias_dim=256, depth=24, dim=256),
    "enwik8_aft_local32_l12_d512": dict(_ENWIK8, mixer="aft_local", window=32, bias_dim=256, depth=12, dim=512),
    "enwik8_aft_simple_l24_d256": dict(_ENWIK8, mixer="aft_simple", depth=24, dim=256),
    "enwik8_transformer_l24_d256": dict(_ENWIK8, mixer="transformer", num_heads=4, depth=24, dim=256),
    "enwik8_transformer_l12_d512": dict(_ENWIK8, mixer="transformer", num_heads=8, depth=12, dim=512),
}


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return sorted(_MODEL_CONFIGS)


def model_config(name: str, **overrides) -> DecoderConfig:
    """The `DecoderConfig` of a named model, with fields replaced by `overrides` (e.g. depth=2, dim=64)."""
    if name not in _MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    fields = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    return DecoderConfig(**{**_MODEL_CONFIGS[name], **overrides})


def create_model(name: str, **overrides) -> Decoder:
    """Builds a named model (see `list_models`), e.g. `create_model("enwik8_aft_local32_l24_d256", depth=2)`."""
    return Decoder(model_config(name, **overrides))
