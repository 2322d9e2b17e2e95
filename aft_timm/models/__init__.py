"""timm model files for AFT vision backbones; importing this package registers them with timm."""
from .aft_vit import AftVisionTransformer, checkpoint_filter_fn, convert_vit_checkpoint

__all__ = ['AftVisionTransformer', 'checkpoint_filter_fn', 'convert_vit_checkpoint']
