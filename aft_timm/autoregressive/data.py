"""Token datasets: CIFAR10 as 3072 sub-pixel tokens, Enwik8 and any local file as a byte stream.

Training batches are a pure function of (seed, step), so a resumed or distributed run sees exactly the batches of an
uninterrupted single-process run.
"""
import hashlib
import math
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .model import IMAGE_SHAPE

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
# SHA-256 of enwik8.zip (36,445,475 bytes; its single member `enwik8` is the 100,000,000-byte file with Matt
# Mahoney's published MD5 a1fa5ffddb56f4953e226637dabbb36a).
ENWIK8_ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ENWIK8_URL_ENV = "AFT_TIMM_ENWIK8_URL"  # overrides ENWIK8_URL, e.g. for a mirror
AUGMENT_SHIFT = 10  # the paper's CIFAR10 augmentation adds one integer in [-10, 10] to every sub-pixel


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (e.g. seed, step)."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


class ByteTokens:
    """A byte stream: training windows at random offsets, evaluation over consecutive windows covering every byte."""

    modality = "text"
    unit = "bits_per_char"

    def __init__(self, data: torch.Tensor, name: str) -> None:
        if data.dim() != 1 or data.dtype != torch.uint8:
            raise ValueError("byte data must be a 1-D uint8 tensor")
        self.data = data
        self.name = name

    def __len__(self) -> int:
        return self.data.numel()

    def num_tokens(self) -> int:
        return self.data.numel()

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
        """The (batch_size, seq_len) uint8 batch of training step `step`."""
        if len(self) < seq_len:
            raise ValueError(f"{self.name} has {len(self)} bytes, fewer than one window of seq_len={seq_len}")
        offsets = torch.randint(0, len(self) - seq_len + 1, (batch_size,), generator=_generator(seed, step))
        return self.data[offsets[:, None] + torch.arange(seq_len)]

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None):
        """Yields (B, T) uint8 windows that cover the split once, in order (the last window may be shorter)."""
        full = len(self) // seq_len
        windows = self.data[: full * seq_len].view(full, seq_len)
        count = 0
        for i in range(0, full, batch_size):
            if max_batches is not None and count >= max_batches:
                return
            yield windows[i : i + batch_size]
            count += 1
        rest = self.data[full * seq_len :]
        if rest.numel() and (max_batches is None or count < max_batches):
            yield rest[None]

    def num_eval_batches(self, batch_size: int, seq_len: int) -> int:
        full, rest = divmod(len(self), seq_len)
        return math.ceil(full / batch_size) + (rest > 0)


class ImageTokens:
    """Images (N, 32, 32, 3) uint8 as 3072 sub-pixel tokens in raster order, R, G, B adjacent."""

    modality = "image"
    unit = "bits_per_dim"

    def __init__(self, images: np.ndarray | torch.Tensor, name: str, augment: bool = False) -> None:
        images = torch.as_tensor(images)
        if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 of shape (N, {', '.join(map(str, IMAGE_SHAPE))}), "
                             f"got {tuple(images.shape)} {images.dtype}")
        self.images = images
        self.name = name
        self.augment = augment
        self._permutation: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def num_tokens(self) -> int:
        return self.images.numel()

    def _epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, torch.randperm(len(self), generator=_generator(seed, epoch, -1)))
        return self._permutation[1]

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
        """The (batch_size, 3072) uint8 batch of step `step`: epochs of shuffled images, augmented if enabled."""
        if seq_len != self.images[0].numel():
            raise ValueError(f"image models need seq_len={self.images[0].numel()}, got {seq_len}")
        indices = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(i, len(self))
            indices.append(int(self._epoch_order(seed, epoch)[pos]))
        images = self.images[indices]
        if self.augment:
            images = augment_images(images, _generator(seed, step, -2))
        return images.reshape(batch_size, -1)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None):
        """Yields (B, 3072) uint8 batches of the images in order, unaugmented."""
        for count, i in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and count >= max_batches:
                return
            yield self.images[i : i + batch_size].reshape(-1, seq_len)

    def num_eval_batches(self, batch_size: int, seq_len: int) -> int:
        return math.ceil(len(self) / batch_size)


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's CIFAR10 augmentation of (N, H, W, C) uint8 images: a random horizontal flip, then one random
    integer in [-10, 10] per image added to all its sub-pixels, clipped to [0, 255]."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    shift = torch.randint(-AUGMENT_SHIFT, AUGMENT_SHIFT + 1, (n,), generator=generator)
    images = torch.where(flip[:, None, None, None], images.flip(2), images)
    return (images.short() + shift[:, None, None, None]).clamp(0, 255).to(torch.uint8)


def split_bytes(data: torch.Tensor, split: str) -> torch.Tensor:
    """The 90% / 5% / 5% train / val / test split of a byte stream (90M / 5M / 5M for Enwik8)."""
    n = data.numel()
    bounds = {"train": (0, n * 90 // 100), "val": (n * 90 // 100, n * 95 // 100), "test": (n * 95 // 100, n)}
    if split not in bounds:
        raise ValueError(f"unknown split {split!r} for a byte dataset; choose train, val or test")
    lo, hi = bounds[split]
    return data[lo:hi]


def read_bytes(path: str | os.PathLike) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    if data.numel() < 20:
        raise ValueError(f"{path} has {data.numel()} bytes; a train/val/test split needs at least 20")
    return data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, path: Path, sha256: str) -> Path:
    """Downloads `url` to `path` with a progress bar, verifies its SHA-256 and only then moves it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        actual = _sha256(partial)
        if actual != sha256:
            raise ValueError(f"checksum mismatch for {url}: SHA-256 {actual}, expected {sha256}; the file was "
                             f"deleted, try again or download it by hand to {path}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def prepare_enwik8(data_dir: str | os.PathLike, url: str | None = None, sha256: str = ENWIK8_ZIP_SHA256) -> Path:
    """Returns the path of `enwik8` in `data_dir`, downloading and verifying enwik8.zip first when needed.

    Args:
        data_dir: Directory holding enwik8 / enwik8.zip.
        url: Download URL; default: $AFT_TIMM_ENWIK8_URL, else the official mattmahoney.net URL.
        sha256: Expected SHA-256 of the zip archive.
    """
    data_dir = Path(data_dir)
    target = data_dir / "enwik8"
    if target.is_file():
        return target
    archive = data_dir / "enwik8.zip"
    if archive.is_file():
        if _sha256(archive) != sha256:
            raise ValueError(f"{archive} does not match the SHA-256 of enwik8.zip ({sha256}); delete it to download "
                             "it again")
    else:
        download(url or os.environ.get(ENWIK8_URL_ENV) or ENWIK8_URL, archive, sha256)
    partial = target.with_name("enwik8.part")
    try:
        with zipfile.ZipFile(archive) as zf, zf.open("enwik8") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    except KeyError as err:
        raise ValueError(f"{archive} has no member named 'enwik8'") from err
    finally:
        partial.unlink(missing_ok=True)
    return target


def load_cifar10(data_dir: str | os.PathLike, split: str, download: bool = True, augment: bool = False) -> ImageTokens:
    """CIFAR10 through torchvision (downloaded into `data_dir` when absent and `download`); split train or test."""
    from torchvision.datasets import CIFAR10

    if split not in ("train", "test"):
        raise ValueError(f"CIFAR10 has the splits train and test, not {split!r}")
    try:
        dataset = CIFAR10(root=str(data_dir), train=split == "train", download=download)
    except RuntimeError as err:
        raise FileNotFoundError(f"CIFAR10 not found or corrupted in {data_dir} (torchvision: {err})") from err
    return ImageTokens(dataset.data, f"cifar10/{split}", augment=augment)


def load_dataset(spec: str, split: str, data_dir: str | os.PathLike = "data", download: bool = True,
                 augment: bool = False) -> ByteTokens | ImageTokens:
    """A split of `cifar10`, `enwik8` or `bytes:PATH` (any file, 90/5/5 split).

    Args:
        spec: Dataset name.
        split: train, val or test (CIFAR10: train or test).
        data_dir: Where CIFAR10 and Enwik8 are stored or downloaded to.
        download: Download a missing dataset.
        augment: CIFAR10 training augmentation (ignored for byte datasets).
    """
    if spec == "cifar10":
        return load_cifar10(data_dir, split, download=download, augment=augment)
    if spec == "enwik8":
        path = Path(data_dir) / "enwik8"
        if not path.is_file() and not download:
            raise FileNotFoundError(f"enwik8 not found in {data_dir} and downloading is disabled")
        return ByteTokens(split_bytes(read_bytes(prepare_enwik8(data_dir)), split), f"enwik8/{split}")
    if spec.startswith("bytes:"):
        path = spec[len("bytes:") :]
        return ByteTokens(split_bytes(read_bytes(path), split), f"{Path(path).name}/{split}")
    raise ValueError(f"unknown dataset {spec!r}; choose cifar10, enwik8 or bytes:PATH")


def eval_split(spec: str) -> str:
    """The held-out split evaluated during training (CIFAR10 has no validation split)."""
    return "test" if spec == "cifar10" else "val"
