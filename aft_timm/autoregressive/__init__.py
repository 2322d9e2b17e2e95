"""Autoregressive AFT decoders (the paper's CIFAR10 and Enwik8 models) and their training / sampling tools.

Command line: `python -m aft_timm.autoregressive {train,eval,sample} --help`.
"""
from .checkpoint import CheckpointError, load_model
from .decoding import IncrementalDecoder
from .model import Decoder, DecoderConfig, create_model, list_models, model_config

__all__ = ["CheckpointError", "Decoder", "DecoderConfig", "IncrementalDecoder", "create_model", "list_models",
           "load_model", "model_config"]
