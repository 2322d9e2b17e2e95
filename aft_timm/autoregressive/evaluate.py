"""Bits per dimension (CIFAR10) or per character (bytes) of a model over a whole data split."""
import contextlib
import math
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import load_model
from .data import ByteTokens, ImageTokens, load_dataset
from .model import Decoder


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for precision "bf16", nothing for "fp32"."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 on CUDA devices that support it and float32 elsewhere (CPU bf16 is slower than float32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return precision


def check_compatible(model: Decoder, dataset: ByteTokens | ImageTokens) -> None:
    if model.config.modality != dataset.modality:
        raise ValueError(f"the model reads {model.config.modality} but {dataset.name} is {dataset.modality} data")


@torch.no_grad()
def evaluate(model: Decoder, dataset: ByteTokens | ImageTokens, batch_size: int, precision: str = "fp32",
             max_batches: int | None = None, progress: bool = False) -> dict[str, float]:
    """Mean negative log-likelihood of every token of `dataset` (or of its first `max_batches` batches).

    Returns:
        {"loss": nats per token, dataset.unit: bits per token, "tokens": number of tokens scored}.
    """
    check_compatible(model, dataset)
    device = next(model.parameters()).device
    seq_len = model.config.seq_len
    total = dataset.num_eval_batches(batch_size, seq_len)
    if max_batches is not None:
        total = min(total, max_batches)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        batches = dataset.eval_batches(batch_size, seq_len, max_batches)
        for batch in tqdm(batches, total=total, disable=not progress,
                          desc=f"eval {dataset.name}", unit="batch"):
            tokens = batch.to(device).long()
            with autocast(device, precision):
                logits = model(tokens)
            nll += F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum").item()
            count += tokens.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"{dataset.name} is empty")
    loss = nll / count
    return {"loss": loss, dataset.unit: loss / math.log(2), "tokens": count}


def run_eval(checkpoint: str, dataset: str, split: str = "test", data_dir: str | os.PathLike = "data",
             batch_size: int = 16, device: str | None = None, precision: str = "auto") -> dict:
    """Evaluates a checkpoint (run dir, checkpoint dir or hf-hub:ID) on a whole split."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(checkpoint, dev)
    data = load_dataset(dataset, split, data_dir)
    metrics = evaluate(model, data, batch_size, resolve_precision(precision, dev), progress=True)
    return {"checkpoint": str(checkpoint), "dataset": dataset, "split": split, **metrics}
