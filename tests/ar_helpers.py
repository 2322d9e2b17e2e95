"""Test data and command-line helpers for the autoregressive tests (tests/test_autoregressive_*.py)."""
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing near an old stone bridge".split()


def make_text_file(path: Path, num_words: int = 12000, seed: int = 0) -> Path:
    """A small English-like corpus: random words from a short vocabulary, with a little UTF-8."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(num_words)]
    text = " ".join(words).replace("bridge", "bridgé")  # a multi-byte character
    path.write_text(text, encoding="utf-8")
    return path


def make_cifar10_files(root: Path, train_per_batch: int = 4, test_images: int = 6, seed: int = 0) -> np.ndarray:
    """Writes cifar-10-batches-py in the on-disk layout of the real archive.

    Each batch file is a pickled dict {"data": (N, 3072) uint8 in planar R, G, B order, "labels": [...]} and
    batches.meta holds the label names. Returns all images, (N, 3, 32, 32), train batches first then test.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test_images if name == "test_batch" else train_per_batch
        planar = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        images.append(planar)
        entry = {"batch_label": name, "data": planar.reshape(n, 3072), "labels": rng.integers(0, 10, n).tolist(),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": train_per_batch, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return np.concatenate(images)


def run_cli(*args: str, cwd: Path, module: str = "aft_timm.autoregressive") -> subprocess.CompletedProcess:
    """Runs `python -m MODULE ARGS` (by default the autoregressive command line) and captures its output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=300)


def cli_env() -> dict:
    """The environment of a command-line run: one thread per process, like a CI core."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}
