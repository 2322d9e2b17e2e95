"""timm model files for AFT vision backbones; importing this package registers them."""
