"""Causal multi-head self-attention: the Transformer baseline's token mixer."""
import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with the same interface as the AFT mixers (`qkv`, `proj`, `proj_drop`).

    Args:
        dim: Model width.
        num_heads: Number of attention heads; must divide `dim`.
        attn_drop: Dropout on the attention probabilities (training only).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projects x (..., T, D) to q, k, v, each (..., heads, T, D / heads)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.num_heads, -1)
        return tuple(t.reshape(shape).transpose(-3, -2) for t in (q, k, v))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse layout of `split_heads` followed by the output projection."""
        y = y.transpose(-3, -2).flatten(-2)
        return self.proj_drop(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        dropout_p = self.attn_drop if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return self.merge_heads(y)
