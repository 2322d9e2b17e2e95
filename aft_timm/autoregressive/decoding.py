"""Token-by-token decoding: constant-size state (AFT-simple, AFT-local, AFT-conv1d) or a cache (AFT-full, attention).

Every AFT mixer computes, per channel, y_t = sigmoid(q_t) * sum_{t'<=t} exp(k_t' + w_{t,t'}) v_t' / (same without v)
with w_{t,t'} = 0 for offsets t - t' >= s. A decoding step therefore keeps
  - a ring buffer of the last s keys and values (the positions that still carry a position bias), and
  - for the positions that left the buffer, a running maximum m and the running sums sum exp(k - m) v and
    sum exp(k - m) (an online log-sum-exp), which never overflow whatever the key magnitudes.
AFT-simple is the s = 1 case without bias; AFT-full keeps every position (s = seq_len, a cache).
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AftConv1d, AftFull, AftLocal, AftSimple
from .attention import CausalSelfAttention

BiasFn = Callable[[int, torch.Tensor], torch.Tensor]


class WindowedExpSum:
    """Causal AFT sums over one sequence stream, a step at a time, in float32.

    Keys are (B, H), values (B, H, C): channel group h shares the key k[:, h] and the position bias of head h.

    Args:
        batch_size, heads, channels: B, H, C.
        window: Positions kept in the ring buffer (the bias support s).
        bias: `bias(t, positions)` -> (H or 1, n) bias w_{t, positions}; None for no bias.
    """

    def __init__(self, batch_size: int, heads: int, channels: int, window: int, bias: BiasFn | None,
                 device: torch.device) -> None:
        kw = dict(device=device, dtype=torch.float32)
        self.window = window
        self.bias = bias
        self.max = torch.full((batch_size, heads), float("-inf"), **kw)
        self.num = torch.zeros(batch_size, heads, channels, **kw)
        self.den = torch.zeros(batch_size, heads, **kw)
        # empty slots hold key -inf: every step reads the whole buffer, so a step costs the same at every position
        self.keys = torch.full((batch_size, heads, window), float("-inf"), **kw)
        self.values = torch.zeros(batch_size, heads, channels, window, **kw)
        self.positions = torch.zeros(window, dtype=torch.long, device=device)

    def _fold(self, key: torch.Tensor, value: torch.Tensor) -> None:
        new_max = torch.maximum(self.max, key)
        scale, weight = torch.exp(self.max - new_max), torch.exp(key - new_max)
        self.num = self.num * scale[..., None] + weight[..., None] * value
        self.den = self.den * scale + weight
        self.max = new_max

    def step(self, t: int, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Adds position t and returns sum exp(k + w) v / sum exp(k + w) over positions <= t, shape (B, H, C)."""
        slot = t % self.window
        if t >= self.window:  # position t - window leaves the bias support: fold it into the running sums
            self._fold(self.keys[..., slot], self.values[..., slot])
        self.keys[..., slot] = key
        self.values[..., slot] = value
        self.positions[slot] = t
        logits = self.keys
        if self.bias is not None:
            logits = logits + self.bias(t, self.positions)
        step_max = torch.maximum(self.max, logits.amax(dim=-1))
        weights = torch.exp(logits - step_max[..., None])
        scale = torch.exp(self.max - step_max)
        num = self.num * scale[..., None] + torch.einsum("bhn,bhcn->bhc", weights, self.values)
        den = self.den * scale + weights.sum(dim=-1)
        return num / den[..., None]


def _factorized_bias(mixer: nn.Module) -> BiasFn:
    pos_w = getattr(mixer, "pos_w", None)
    if pos_w is not None:
        return lambda t, positions: pos_w[t, positions].float()[None]
    return lambda t, positions: (mixer.pos_v[positions].float() @ mixer.pos_u[t].float())[None]


class AftStepper:
    """One causal AFT mixer (local, simple, full or conv1d) run one position at a time."""

    def __init__(self, mixer: nn.Module, batch_size: int, device: torch.device) -> None:
        self.mixer = mixer
        dim = mixer.proj.in_features
        if isinstance(mixer, AftConv1d):
            kernel = mixer.kernel().detach().float()  # (H, s); w[h, j] applies at lag t - t' = s - 1 - j
            heads, size = kernel.shape

            def bias(t: int, positions: torch.Tensor) -> torch.Tensor:
                return kernel[:, size - 1 - (t - positions)]
        elif isinstance(mixer, AftLocal):
            heads, size, bias = dim, mixer.window, _factorized_bias(mixer)
        elif isinstance(mixer, AftFull):
            seq_len = (mixer.pos_w if getattr(mixer, "pos_w", None) is not None else mixer.pos_u).shape[0]
            heads, size, bias = dim, seq_len, _factorized_bias(mixer)
        elif isinstance(mixer, AftSimple):
            heads, size, bias = dim, 1, None
        else:
            raise TypeError(f"no recurrent form for {type(mixer).__name__}")
        self.dim, self.heads = dim, heads
        self.sums = WindowedExpSum(batch_size, heads, dim // heads, size, bias, device)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        q, k, v = self.mixer.qkv(x).float().split([self.dim, self.heads, self.dim], dim=-1)
        y = self.sums.step(t, k, v.reshape(v.shape[0], self.heads, -1)).reshape(q.shape)
        y = torch.sigmoid(q) * y
        return self.mixer.proj_drop(self.mixer.proj(y.to(x.dtype)))


class AttentionStepper:
    """Causal self-attention run one position at a time with a key/value cache."""

    def __init__(self, mixer: CausalSelfAttention, batch_size: int, seq_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.mixer = mixer
        head_dim = mixer.proj.in_features // mixer.num_heads
        shape = (batch_size, mixer.num_heads, seq_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        q, k, v = self.mixer.split_heads(x[:, None])  # (B, H, 1, Dh) each
        self.keys[:, :, t : t + 1] = k
        self.values[:, :, t : t + 1] = v
        y = F.scaled_dot_product_attention(q, self.keys[:, :, : t + 1], self.values[:, :, : t + 1])
        return self.mixer.merge_heads(y)[:, 0]


class IncrementalDecoder:
    """Runs a `Decoder` one token at a time; `step` returns the logits for the next token.

    The first token fed is normally the model's start token. Call under `torch.no_grad()` with the model in eval mode
    (dropout would otherwise differ from the parallel forward).
    """

    def __init__(self, model: nn.Module, batch_size: int) -> None:
        self.model = model
        self.seq_len = model.config.seq_len
        param = next(model.parameters())
        self.steppers = []
        for block in model.blocks:
            if isinstance(block.mixer, CausalSelfAttention):
                stepper = AttentionStepper(block.mixer, batch_size, self.seq_len, param.device, param.dtype)
            else:
                stepper = AftStepper(block.mixer, batch_size, param.device)
            self.steppers.append(stepper)
        self.position = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds tokens (B,) at the next position; returns (B, vocab_size) logits."""
        if self.position >= self.seq_len:
            raise ValueError(f"cannot decode past the model's context of {self.seq_len} tokens (seq_len)")
        model, t = self.model, self.position
        x = model.drop(model.tok_emb(tokens) + model.pos_emb[t])
        for block, stepper in zip(model.blocks, self.steppers):
            x = x + stepper(block.norm1(x), t)
            x = x + block.mlp(block.norm2(x))
        self.position += 1
        return model.head(model.norm(x))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws one token per row of (B, V) logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """See `Decoder.generate`."""
    model.check_tokens(prompt)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.config.seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds "
                         f"the model's context of {model.config.seq_len} (seq_len)")
    was_training = model.training
    model.eval()
    try:
        batch = prompt.shape[0]
        device = next(model.parameters()).device
        out = torch.empty(batch, total, dtype=torch.long, device=device)
        out[:, : prompt.shape[1]] = prompt.to(device)
        decoder = IncrementalDecoder(model, batch)
        token = torch.full((batch,), model.start_token, dtype=torch.long, device=device)
        for t in range(total):
            logits = decoder.step(token)
            if t >= prompt.shape[1]:
                out[:, t] = sample_next(logits, temperature, top_k, generator)
            token = out[:, t]
        return out
    finally:
        model.train(was_training)
