"""Sampling from a trained model: a PNG grid of images or UTF-8 text."""
import math
import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from .checkpoint import load_model
from .model import IMAGE_SHAPE

TEXT_SEPARATOR = "\n\n" + "=" * 80 + "\n\n"


def tokens_to_images(tokens: torch.Tensor) -> torch.Tensor:
    """(N, 3072) sub-pixel tokens in raster order to (N, 3, 32, 32) uint8 images."""
    return tokens.to(torch.uint8).reshape(-1, *IMAGE_SHAPE).permute(0, 3, 1, 2)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike) -> None:
    """Writes (N, 3, H, W) uint8 images as one PNG grid, about square."""
    grid = make_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])), padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(path, format="PNG")


def run_sample(checkpoint: str, num: int, output: str | os.PathLike, max_new_tokens: int | None = None,
               temperature: float = 1.0, top_k: int | None = None, prompt: str = "", seed: int = 0,
               device: str | None = None) -> Path:
    """Samples `num` sequences from a checkpoint and writes them to `output`.

    Image models generate whole images (a PNG grid). Text models continue the UTF-8 `prompt` by `max_new_tokens` bytes
    (default: up to the model's context) and write the samples as UTF-8 text, invalid bytes replaced, separated by a
    line of "=" characters.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(checkpoint, dev)
    generator = torch.Generator(dev).manual_seed(seed)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if model.config.modality == "image":
        if prompt:
            raise ValueError("image models sample whole images; a prompt is not supported")
        empty = torch.zeros(num, 0, dtype=torch.long, device=dev)
        tokens = model.generate(empty, model.config.seq_len, temperature, top_k, generator)
        save_image_grid(tokens_to_images(tokens), output)
        return output
    prefix = torch.tensor(list(prompt.encode("utf-8")), dtype=torch.long, device=dev).repeat(num, 1)
    if max_new_tokens is None:
        max_new_tokens = model.config.seq_len - prefix.shape[1]
    tokens = model.generate(prefix, max_new_tokens, temperature, top_k, generator)
    texts = [bytes(row.tolist()).decode("utf-8", errors="replace") for row in tokens.cpu()]
    output.write_text(TEXT_SEPARATOR.join(texts) + "\n", encoding="utf-8")
    return output
