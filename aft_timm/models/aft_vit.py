""" AFT vision backbones: Attention Free Transformers on the DeiT skeleton

The image models of the AFT paper (Table 7 and 8): a DeiT (ViT with 16x16 patches, pre-norm blocks, MLP x4) whose
multi-head attention is replaced by an attention-free token mixer:

* AFT-full: a learned, factorized pair-wise position bias w = u v^T (d' = 128); keeps the class token and the
  position embedding, so its input size is fixed at construction (position parameters resample to other sizes).
* AFT-simple: no position bias; also keeps the class token and the position embedding.
* AFT-conv: a per-head 2-D convolutional position bias over the patch grid; no class token, no position embedding,
  global average pooling. Fully convolutional: runs at any input size divisible by the patch size, tokens stay on an
  (B, H, W, C) grid through the whole network and its features are spatial maps.

Papers:
* `An Attention Free Transformer` - https://arxiv.org/abs/2105.14103
* `Training data-efficient image transformers & distillation through attention` - https://arxiv.org/abs/2012.12877

The model interface follows timm's `vision_transformer.py` (Ross Wightman); the DeiT warm start follows the AFT
paper's Table 8 and loads timm's published DeiT checkpoints.
"""
import logging
import re
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, Mlp, PatchEmbed, calculate_drop_path_rates, resample_abs_pos_embed, \
    trunc_normal_, _assert
from timm.models import adapt_input_conv, build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, \
    register_model
from timm.models._features import feature_take_indices
from timm.models._input import get_pretrained_grid_size, update_model_input_size
from timm.models.vision_transformer import global_pool_nlc

from aft_timm.layers import AftConv2d, AftFull, AftSimple

__all__ = ['AftVisionTransformer', 'convert_vit_checkpoint', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)

TOKEN_MIXERS = ('full', 'simple', 'conv')
POOL_TYPES = ('', 'avg', 'max', 'avgmax', 'token')
OUTPUT_FORMATS = ('NCHW', 'NHWC', 'NLC')


class Block(nn.Module):
    """Pre-norm transformer block with an attention-free token mixer.

    Works on tokens of shape (B, N, C) and on channels-last grids (B, H, W, C) alike: the norms and the MLP act on
    the last dimension, and the token mixer takes whichever layout it was built for.
    """

    def __init__(
            self,
            dim: int,
            token_mixer: nn.Module,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            dim: Embedding width.
            token_mixer: The AFT layer mixing information across tokens (AftFull, AftSimple or AftConv2d).
            mlp_ratio: MLP hidden width relative to dim.
            proj_drop: Dropout after the MLP's layers.
            drop_path: Stochastic depth rate of both residual branches.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = LayerNorm(dim, eps=1e-6, **dd)
        self.token_mixer = token_mixer
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.token_mixer(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class AftVisionTransformer(nn.Module):
    """Vision transformer whose attention is an AFT token mixer (`An Attention Free Transformer`, Zhai et al. 2021).

    AFT-full and AFT-simple process a (B, 1 + N, C) token sequence with a class token and a learned position
    embedding at a fixed input size. AFT-conv processes a (B, H, W, C) grid of patch tokens without either and
    accepts any input size divisible by the patch size.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Optional[str] = None,
            embed_dim: int = 192,
            depth: int = 12,
            token_mixer: str = 'conv',
            num_heads: int = 32,
            kernel_size: int = 11,
            bias_dim: int = 128,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            img_size: Input size. Fixed for AFT-full and AFT-simple; the nominal size of AFT-conv, which accepts any
                size divisible by patch_size.
            patch_size: Side of the square patches (and the stride of the patch embedding).
            in_chans: Number of input image channels.
            num_classes: Classifier outputs; 0 leaves the pooled features as output.
            global_pool: '' (none), 'avg', 'max', 'avgmax' over patch tokens, or 'token' (class token, AFT-full and
                AFT-simple only). None picks the paper's choice: 'token' with a class token, 'avg' for AFT-conv.
            embed_dim: Token width.
            depth: Number of blocks.
            token_mixer: 'full', 'simple' or 'conv'.
            num_heads: AFT-conv heads (each head has its own 2-D position kernel and one key channel).
            kernel_size: AFT-conv kernel side (odd).
            bias_dim: AFT-full rank d' of the factorized position bias.
            mlp_ratio: MLP hidden width relative to embed_dim.
            qkv_bias: Bias in the query/key/value projection.
            drop_rate: Dropout before the classifier.
            pos_drop_rate: Dropout after the patch (and position) embedding.
            proj_drop_rate: Dropout after the token mixer's output projection and the MLP's layers.
            drop_path_rate: Stochastic depth rate, increasing linearly to this value over the blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if token_mixer not in TOKEN_MIXERS:
            raise ValueError(f"token_mixer must be one of {TOKEN_MIXERS}, got {token_mixer!r}.")
        is_conv = token_mixer == 'conv'
        global_pool = ('avg' if is_conv else 'token') if global_pool is None else global_pool
        self._check_pool_type(global_pool, has_class_token=not is_conv)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.token_mixer_type = token_mixer
        self.has_class_token = not is_conv
        self.num_prefix_tokens = 0 if is_conv else 1
        self.grad_checkpointing = False
        if is_conv:
            self.output_fmt = 'NHWC'  # tokens stay on a (B, H, W, C) grid: features are channels-last maps

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt='NHWC' if is_conv else None,
            strict_img_size=not is_conv,
            **dd,
        )
        self.patch_size = self.patch_embed.patch_size
        num_patches = self.patch_embed.num_patches
        if is_conv:
            self.cls_token = None
            self.pos_embed = None
        else:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim,
                token_mixer=self._create_token_mixer(
                    token_mixer, embed_dim, 1 + num_patches, num_heads, kernel_size, bias_dim, qkv_bias,
                    proj_drop_rate, **dd),
                mlp_ratio=mlp_ratio,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                **dd,
            )
            for i in range(depth)])
        reduction = self.patch_size[0]
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = LayerNorm(embed_dim, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.init_weights()

    @staticmethod
    def _create_token_mixer(
            kind: str,
            dim: int,
            seq_len: int,
            num_heads: int,
            kernel_size: int,
            bias_dim: int,
            qkv_bias: bool,
            proj_drop: float,
            device=None,
            dtype=None,
    ) -> nn.Module:
        dd = {'device': device, 'dtype': dtype}
        if kind == 'full':
            return AftFull(dim, seq_len=seq_len, bias_dim=bias_dim, qkv_bias=qkv_bias, proj_drop=proj_drop, **dd)
        if kind == 'simple':
            return AftSimple(dim, qkv_bias=qkv_bias, proj_drop=proj_drop, **dd)
        return AftConv2d(dim, num_heads, kernel_size, qkv_bias=qkv_bias, proj_drop=proj_drop, **dd)

    @staticmethod
    def _check_pool_type(pool_type: str, has_class_token: bool) -> None:
        if pool_type not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}.")
        if pool_type == 'token' and not has_class_token:
            raise ValueError("global_pool='token' needs a class token; AFT-conv has none, use 'avg'.")

    def init_weights(self) -> None:
        """DeiT/timm initialization of the embeddings and linear layers; AFT position parameters keep their own."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameters exempt from weight decay: the position embedding, class token and AFT-full position factors."""
        names = {'pos_embed', 'cls_token'} if self.has_class_token else set()
        if self.token_mixer_type == 'full':
            names |= {'blocks.*.token_mixer.pos_u', 'blocks.*.token_mixer.pos_v'}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay: the stem, then one group per block."""
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier, keeping the model's device, dtype and train/eval mode.

        Args:
            num_classes: New number of classes; 0 removes the classifier.
            global_pool: New pooling ('' for none); None keeps the current one.
        """
        if global_pool is not None:
            self._check_pool_type(global_pool, self.has_class_token)
            self.global_pool = global_pool
        self.num_classes = num_classes
        reference = self.patch_embed.proj.weight
        self.head = nn.Linear(self.embed_dim, num_classes, device=reference.device, dtype=reference.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Change the input size; the position embedding and AFT-full's position bias are resampled to the new grid.

        Args:
            img_size: New input size (int or (H, W)), a multiple of the patch size.
        """
        prev_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size)
        new_grid = self.patch_embed.grid_size
        if new_grid != prev_grid:
            if self.pos_embed is not None:
                self.pos_embed = nn.Parameter(
                    _resample_prefixed_grid(self.pos_embed, new_grid, prev_grid, 'bicubic'),
                    requires_grad=self.pos_embed.requires_grad,
                )
            for block in self.blocks:
                mixer = block.token_mixer
                if isinstance(mixer, AftFull):
                    for name in ('pos_u', 'pos_v'):
                        old = getattr(mixer, name)
                        new = _resample_prefixed_grid(old.unsqueeze(0), new_grid, prev_grid, 'bilinear').squeeze(0)
                        setattr(mixer, name, nn.Parameter(new, requires_grad=old.requires_grad))
                    mixer.seq_len = 1 + new_grid[0] * new_grid[1]
        update_model_input_size(self, self.patch_embed.img_size)

    def _check_input(self, x: torch.Tensor) -> None:
        """Fail with the expected input shape on a wrong rank, channel count or image size."""
        if self.has_class_token:
            expected = f'(B, {self.in_chans}, {self.patch_embed.img_size[0]}, {self.patch_embed.img_size[1]})'
            hint = 'this model has a fixed input size: build it with img_size=... or call set_input_size()'
        else:
            expected = f'(B, {self.in_chans}, H, W) with H and W multiples of {self.patch_size[0]}'
            hint = 'AFT-conv accepts any such size'
        _assert(x.ndim == 4, f'Expected an image batch of shape {expected}, got shape {x.shape}.')
        _assert(x.shape[1] == self.in_chans, f'Expected an image batch of shape {expected}, got shape {x.shape}.')
        if self.has_class_token:
            _assert(x.shape[2] == self.patch_embed.img_size[0], f'Expected shape {expected}, got {x.shape}: {hint}.')
            _assert(x.shape[3] == self.patch_embed.img_size[1], f'Expected shape {expected}, got {x.shape}: {hint}.')
        else:
            _assert(x.shape[2] % self.patch_size[0] == 0, f'Expected shape {expected}, got {x.shape}: {hint}.')
            _assert(x.shape[3] % self.patch_size[1] == 0, f'Expected shape {expected}, got {x.shape}: {hint}.')

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.patch_embed(x)
        if self.cls_token is not None and self.pos_embed is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = x + self.pos_embed
        return self.pos_drop(x)

    def _to_output_fmt(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        """Patch tokens of a block output in the requested layout (prefix tokens removed)."""
        if self.has_class_token:  # fixed input size: the grid is the patch embedding's
            grid_size = self.patch_embed.grid_size
            x = x[:, self.num_prefix_tokens:].reshape(x.shape[0], grid_size[0], grid_size[1], x.shape[-1])
        if output_fmt == 'NCHW':
            return x.permute(0, 3, 1, 2).contiguous()
        if output_fmt == 'NLC':
            return x.flatten(1, 2)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns the outputs of selected blocks.

        Args:
            x: Input images (B, C, H, W).
            indices: Take the last n blocks if int, all if None, those listed (negative from the end) if a list.
            norm: Apply the final norm to the intermediates.
            stop_early: Stop after the last block needed.
            output_fmt: Intermediate layout: 'NCHW', 'NHWC' (patch grids) or 'NLC' (patch tokens).
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or (final features as forward_features returns them, intermediates).
        """
        _assert(output_fmt in OUTPUT_FORMATS, f'output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt}.')
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._embed(x)

        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self._to_output_fmt(self.norm(x) if norm else x, output_fmt))

        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally the final norm and head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized tokens: (B, 1 + N, C) for AFT-full/simple, a (B, H, W, C) grid for AFT-conv."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        return x

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if not self.has_class_token:
            x = x.flatten(1, 2)  # (B, H, W, C) grid -> (B, N, C) tokens
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _resample_prefixed_grid(
        table: torch.Tensor,
        new_grid: Tuple[int, int],
        old_grid: Optional[Tuple[int, int]],
        interpolation: str,
) -> torch.Tensor:
    """Resample a (1, 1 + H*W, C) table laid out as one class-token row followed by a 2-D patch grid."""
    return resample_abs_pos_embed(
        table,
        new_size=list(new_grid),
        old_size=list(old_grid) if old_grid is not None else None,
        num_prefix_tokens=1,
        interpolation=interpolation,
        antialias=interpolation == 'bicubic',
        verbose=True,
    )


def _source_grid(model: AftVisionTransformer, state_dict: Dict[str, torch.Tensor], num_tokens: int) -> Tuple[int, int]:
    """Patch grid a checkpoint's position table was trained on (from the model's source metadata, else square)."""
    grid = get_pretrained_grid_size(model, state_dict.get('patch_embed.proj.weight'), num_tokens)
    if grid is not None:
        return grid
    side = int(round(num_tokens ** 0.5))
    if side * side != num_tokens:
        raise ValueError(
            f'Cannot infer the patch grid of a checkpoint position table with {num_tokens} patch tokens: it is not '
            f'square and the model carries no source img_size (pass pretrained_model_args=dict(img_size=...)).')
    return side, side


def _unwrap_state_dict(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    return state_dict


_VIT_BLOCK_KEY = re.compile(r'^blocks\.(\d+)\.(.+)$')
# excluded from the DeiT warm start by the AFT paper (Table 8), or DeiT's distillation parts
_VIT_NOT_CARRIED = ('cls_token', 'pos_embed', 'dist_token', 'reg_token', 'head_dist.weight', 'head_dist.bias')


def _is_vit_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(_VIT_BLOCK_KEY.match(k) and '.attn.' in k for k in state_dict)


def convert_vit_checkpoint(
        state_dict: Dict[str, Any],
        model: AftVisionTransformer,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]:
    """Convert a timm ViT/DeiT state dict into a full state dict for an AFT model (paper Table 8 warm start).

    Carried over: patch embedding, norms, the value rows of the fused qkv projection (weight and bias), the output
    projection, MLPs, final norm and classifier (when its class count fits). Left at the model's current values:
    position embedding, class token, the query and key rows of qkv, AFT position parameters, and a classifier of
    another class count. Dropped: everything else in the checkpoint (DeiT's distillation token and head, ...).
    A patch embedding with another input channel count is adapted as timm adapts pretrained stems.

    Args:
        state_dict: A timm ViT/DeiT state dict (optionally wrapped in 'model' / 'state_dict').
        model: The AFT model whose current parameters fill in what is not carried over.

    Returns:
        (state dict loadable with strict=True, report). The report lists model keys under 'carried' and
        'initialized' (qkv appears as 'KEY[v]' carried and 'KEY[q,k]' initialized) and checkpoint keys under
        'dropped'.

    Raises:
        ValueError: the checkpoint does not fit the model (embed width, depth, patch size, MLP width).
    """
    state_dict = _unwrap_state_dict(state_dict)
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    report: Dict[str, List[str]] = {'carried': [], 'initialized': [], 'dropped': []}

    src_depth = 1 + max((int(m.group(1)) for m in map(_VIT_BLOCK_KEY.match, state_dict) if m), default=-1)
    if src_depth != len(model.blocks):
        raise ValueError(f'The checkpoint has {src_depth} blocks, the model {len(model.blocks)}: depths must match.')

    def misfit(src_key: str, dst_key: str, value: torch.Tensor, expected: Tuple[int, ...]) -> ValueError:
        return ValueError(
            f"Checkpoint tensor '{src_key}' of shape {tuple(value.shape)} does not fit '{dst_key}' of shape "
            f"{tuple(expected)} (model embed_dim={model.embed_dim}, patch_size={tuple(model.patch_size)}).")

    dim = model.embed_dim
    for key, value in state_dict.items():
        match = _VIT_BLOCK_KEY.match(key)
        if key in _VIT_NOT_CARRIED:
            report['dropped'].append(key)
            continue
        if match and match.group(2) in ('attn.qkv.weight', 'attn.qkv.bias'):
            dst = f'blocks.{match.group(1)}.token_mixer.qkv.{key.rsplit(".", 1)[1]}'
            current = target[dst]
            if value.shape[0] != 3 * dim or value.shape[1:] != current.shape[1:]:
                raise misfit(key, dst, value, (3 * dim, *current.shape[1:]))
            merged = current.clone()
            merged[-dim:] = value[2 * dim:].to(current.dtype)  # v rows; q and k rows keep the model's values
            out[dst] = merged
            report['carried'].append(f'{dst}[v]')
            report['initialized'].append(f'{dst}[q,k]')
            continue
        dst = f'blocks.{match.group(1)}.token_mixer.{match.group(2)[len("attn."):]}' \
            if match and match.group(2).startswith('attn.') else key
        if dst not in target:
            report['dropped'].append(key)
            continue
        current = target[dst]
        if dst == 'patch_embed.proj.weight' and value.ndim == 4 and value.shape[1] != current.shape[1] \
                and value.shape[0] == current.shape[0] and value.shape[2:] == current.shape[2:]:
            value = adapt_input_conv(current.shape[1], value)
        if value.shape != current.shape:
            if dst.startswith('head.'):  # another class count: the model keeps its own classifier
                report['dropped'].append(key)
                continue
            raise misfit(key, dst, value, tuple(current.shape))
        out[dst] = value.to(current.dtype)
        report['carried'].append(dst)

    for key, value in target.items():
        if key not in out:
            out[key] = value
            report['initialized'].append(key)
    return out, report


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: AftVisionTransformer) -> Dict[str, torch.Tensor]:
    """Prepare a checkpoint for `model`: convert timm ViT/DeiT checkpoints, resample position tables to its grid."""
    state_dict = _unwrap_state_dict(state_dict)
    if _is_vit_state_dict(state_dict):
        converted, report = convert_vit_checkpoint(state_dict, model)
        _logger.info(
            f'Converted a ViT/DeiT checkpoint: carried {len(report["carried"])} tensors, left '
            f'{len(report["initialized"])} at initialization (position embedding, class token, query/key rows, '
            f'AFT position parameters), dropped {report["dropped"]}.')
        return converted

    new_grid = model.patch_embed.grid_size
    params = dict(model.named_parameters())
    out = {}
    for key, value in state_dict.items():
        if key == 'pos_embed' and model.pos_embed is not None and value.shape != model.pos_embed.shape:
            value = _resample_prefixed_grid(
                value, new_grid, _source_grid(model, state_dict, value.shape[1] - 1), 'bicubic')
        elif key.endswith(('.token_mixer.pos_u', '.token_mixer.pos_v')) and value.ndim == 2:
            current = params.get(key)
            if current is not None and value.shape[0] != current.shape[0]:
                old_grid = _source_grid(model, state_dict, value.shape[0] - 1)
                value = _resample_prefixed_grid(value.unsqueeze(0), new_grid, old_grid, 'bilinear').squeeze(0)
        out[key] = value
    return out


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2105.14103',
        'paper_name': 'An Attention Free Transformer',
        'origin_url': 'https://arxiv.org/abs/2105.14103',
        **kwargs,
    }


def _conv_cfg(**kwargs) -> Dict[str, Any]:
    """AFT-conv: any size divisible by the patch, spatial (H/16, W/16) features."""
    size = kwargs.get('input_size', (3, 224, 224))[-1]
    return _cfg(fixed_input_size=False, pool_size=(size // 16, size // 16), **kwargs)


_UNTRAINED_NOTES = 'No weights: random initialization (no AFT ImageNet weights are available to load).'


def _deit_init(deit_hub_id: str, **kwargs) -> Dict[str, Any]:
    """A DeiT checkpoint converted on load into an AFT model, as the paper initializes AFT-conv base (Table 8)."""
    return dict(
        hf_hub_id=deit_hub_id,
        origin_url='https://github.com/facebookresearch/deit',
        notes=(
            f'DeiT initialization for fine-tuning (AFT paper, Table 8), not an AFT ImageNet result: the weights of '
            f'{deit_hub_id} are converted on load by carrying the patch embedding, norms, value and output '
            f'projections, MLPs and classifier, and leaving the position embedding, class token and the key and '
            f'query projections at initialization. Fine-tune before use.'),
        **kwargs,
    )


# The DeiT warm-start tags come first: timm makes the first tag with weights the default, so pretrained=True with no
# tag loads the DeiT initialization where one exists; '.untrained' (no weights) is the explicit random-init tag.
default_cfgs = generate_default_cfgs({
    'aft_full_tiny_patch16_224.untrained': _cfg(notes=_UNTRAINED_NOTES),
    'aft_full_small_patch16_224.untrained': _cfg(notes=_UNTRAINED_NOTES),
    'aft_simple_tiny_patch16_224.deit_in1k_init': _cfg(**_deit_init('timm/deit_tiny_patch16_224.fb_in1k')),
    'aft_simple_tiny_patch16_224.untrained': _cfg(notes=_UNTRAINED_NOTES),
    'aft_simple_small_patch16_224.deit_in1k_init': _cfg(**_deit_init('timm/deit_small_patch16_224.fb_in1k')),
    'aft_simple_small_patch16_224.untrained': _cfg(notes=_UNTRAINED_NOTES),
    'aft_conv_tiny_h32_k11_patch16_224.deit_in1k_init': _conv_cfg(
        **_deit_init('timm/deit_tiny_patch16_224.fb_in1k')),
    'aft_conv_tiny_h32_k11_patch16_224.untrained': _conv_cfg(notes=_UNTRAINED_NOTES),
    'aft_conv_tiny_h192_k11_patch16_224.deit_in1k_init': _conv_cfg(
        **_deit_init('timm/deit_tiny_patch16_224.fb_in1k')),
    'aft_conv_tiny_h192_k11_patch16_224.untrained': _conv_cfg(notes=_UNTRAINED_NOTES),
    'aft_conv_small_h16_k11_patch16_224.deit_in1k_init': _conv_cfg(
        **_deit_init('timm/deit_small_patch16_224.fb_in1k')),
    'aft_conv_small_h16_k11_patch16_224.untrained': _conv_cfg(notes=_UNTRAINED_NOTES),
    'aft_conv_small_h384_k11_patch16_224.deit_in1k_init': _conv_cfg(
        **_deit_init('timm/deit_small_patch16_224.fb_in1k')),
    'aft_conv_small_h384_k11_patch16_224.untrained': _conv_cfg(notes=_UNTRAINED_NOTES),
    'aft_conv_small_h384_k15_patch16_224.deit_in1k_init': _conv_cfg(
        **_deit_init('timm/deit_small_patch16_224.fb_in1k')),
    'aft_conv_small_h384_k15_patch16_224.untrained': _conv_cfg(notes=_UNTRAINED_NOTES),
    'aft_conv_base_h32_k25_patch16_384.deit_in1k_init': _conv_cfg(
        input_size=(3, 384, 384), crop_pct=1.0, **_deit_init('timm/deit_base_patch16_384.fb_in1k')),
    'aft_conv_base_h32_k25_patch16_384.untrained': _conv_cfg(
        input_size=(3, 384, 384), crop_pct=1.0, notes=_UNTRAINED_NOTES),
})


def _create_aft_vit(variant: str, pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        AftVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def aft_full_tiny_patch16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-full tiny (DeiT-tiny skeleton, factorized position bias d'=128), paper Table 7: 6.3M params."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, token_mixer='full', bias_dim=128)
    return _create_aft_vit('aft_full_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_full_small_patch16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-full small (DeiT-small skeleton, factorized position bias d'=128), paper Table 7: 22.6M params."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, token_mixer='full', bias_dim=128)
    return _create_aft_vit('aft_full_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_simple_tiny_patch16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-simple on the DeiT-tiny skeleton (no position bias): 5.7M params."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, token_mixer='simple')
    return _create_aft_vit('aft_simple_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_simple_small_patch16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-simple on the DeiT-small skeleton (no position bias): 22.1M params."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, token_mixer='simple')
    return _create_aft_vit('aft_simple_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_tiny_h32_k11_patch16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv tiny, 32 heads, 11x11 kernels, paper Table 7: 5.4M params."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, token_mixer='conv', num_heads=32, kernel_size=11)
    return _create_aft_vit('aft_conv_tiny_h32_k11_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_tiny_h192_k11_patch16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv tiny, 192 heads, 11x11 kernels, paper Table 7: 5.9M params."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, token_mixer='conv', num_heads=192, kernel_size=11)
    return _create_aft_vit('aft_conv_tiny_h192_k11_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_small_h16_k11_patch16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv small, 16 heads, 11x11 kernels, paper Table 7: 20.3M params."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, token_mixer='conv', num_heads=16, kernel_size=11)
    return _create_aft_vit('aft_conv_small_h16_k11_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_small_h384_k11_patch16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv small, 384 heads, 11x11 kernels, paper Table 7: 22.5M params."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, token_mixer='conv', num_heads=384, kernel_size=11)
    return _create_aft_vit('aft_conv_small_h384_k11_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_small_h384_k15_patch16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv small, 384 heads, 15x15 kernels, paper Table 7: 23.0M params (81.0 top-1 at 224, 81.6 at 384)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, token_mixer='conv', num_heads=384, kernel_size=15)
    return _create_aft_vit('aft_conv_small_h384_k15_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_base_h32_k25_patch16_384(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv base at 384x384, 32 heads, 25x25 kernels, paper Table 8 (DeiT-base warm start): 79.7M params."""
    model_args = dict(
        img_size=384, patch_size=16, embed_dim=768, depth=12, token_mixer='conv', num_heads=32, kernel_size=25)
    return _create_aft_vit('aft_conv_base_h32_k25_patch16_384', pretrained=pretrained, **dict(model_args, **kwargs))
