"""aft_timm.autoregressive.data: byte splits, Enwik8 download (local HTTP server), CIFAR10 files and augmentation."""
import functools
import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from aft_timm.autoregressive.data import (
    ENWIK8_URL_ENV,
    ByteTokens,
    ImageTokens,
    augment_images,
    load_cifar10,
    load_dataset,
    prepare_enwik8,
    split_bytes,
)
from ar_helpers import make_cifar10_files


class _Server:
    """A real HTTP server on 127.0.0.1 serving one directory, counting the requests it answers."""

    def __init__(self, directory: Path) -> None:
        self.requests = 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests += 1
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=directory))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _enwik8_zip(directory: Path, content: bytes, member: str = "enwik8") -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, content)
    (directory / "enwik8.zip").write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def test_byte_split_is_90_5_5_and_contiguous():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    parts = [split_bytes(data, s) for s in ("train", "val", "test")]
    assert [p.numel() for p in parts] == [900, 50, 50]
    assert torch.equal(torch.cat(parts), data)
    enwik8_sized = torch.empty(100_000_000, dtype=torch.uint8)
    sizes = [split_bytes(enwik8_sized, s).numel() for s in ("train", "val", "test")]
    assert sizes == [90_000_000, 5_000_000, 5_000_000]
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        split_bytes(data, "valid")


def test_byte_batches_are_deterministic_windows():
    data = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    ds = ByteTokens(data, "x")
    a, b = ds.train_batch(7, 4, 32, seed=1), ds.train_batch(7, 4, 32, seed=1)
    assert a.shape == (4, 32) and torch.equal(a, b)
    assert not torch.equal(a, ds.train_batch(8, 4, 32, seed=1))
    assert not torch.equal(a, ds.train_batch(7, 4, 32, seed=2))
    raw = data.numpy().tobytes()
    assert all(bytes(row.tolist()) in raw for row in a)  # every row is a real window of the stream
    with pytest.raises(ValueError, match="fewer than one window of seq_len=6000"):
        ds.train_batch(0, 1, 6000, seed=0)


def test_byte_eval_batches_cover_the_split_once_in_order():
    data = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    ds = ByteTokens(data, "x")
    batches = list(ds.eval_batches(batch_size=3, seq_len=64))
    assert [tuple(b.shape) for b in batches] == [(3, 64)] * 5 + [(1, 40)]
    assert len(batches) == ds.num_eval_batches(3, 64)
    assert torch.equal(torch.cat([b.flatten() for b in batches]), data)
    assert len(list(ds.eval_batches(3, 64, max_batches=2))) == 2


def test_bytes_dataset_from_a_file(tmp_path):
    path = tmp_path / "corpus.bin"
    path.write_bytes(bytes(range(256)) * 4)
    test = load_dataset(f"bytes:{path}", "test")
    assert torch.equal(test.data, torch.tensor(list(bytes(range(256)) * 4)[972:], dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.txt"):
        load_dataset(f"bytes:{tmp_path / 'missing.txt'}", "train")
    (tmp_path / "small").write_bytes(b"abc")
    with pytest.raises(ValueError, match="has 3 bytes"):
        load_dataset(f"bytes:{tmp_path / 'small'}", "train")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", "train")


def test_enwik8_download_from_local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    content = bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8))
    sha = _enwik8_zip(served, content)
    data_dir = tmp_path / "data"
    with _Server(served) as server:
        path = prepare_enwik8(data_dir, url=server.url("enwik8.zip"), sha256=sha)
        assert path == data_dir / "enwik8" and path.read_bytes() == content
        assert (data_dir / "enwik8.zip").read_bytes() == (served / "enwik8.zip").read_bytes()
        assert prepare_enwik8(data_dir, url=server.url("enwik8.zip"), sha256=sha) == path
        assert server.requests == 1  # prepared data is reused, not downloaded again
    assert sorted(p.name for p in data_dir.iterdir()) == ["enwik8", "enwik8.zip"]
    test = load_dataset("enwik8", "test", data_dir)  # the standard split of the extracted file
    assert test.data.numel() == 1000 and bytes(test.data.tolist()) == content[19_000:]


def test_enwik8_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    _enwik8_zip(served, b"not the real enwik8" * 100)
    data_dir = tmp_path / "data"
    with _Server(served) as server:
        # Through the dataset name, with the URL from the environment and the real enwik8.zip checksum.
        monkeypatch.setenv(ENWIK8_URL_ENV, server.url("enwik8.zip"))
        with pytest.raises(ValueError, match="checksum mismatch for http://127.0.0.1:.*expected 547994d9"):
            load_dataset("enwik8", "train", data_dir)
        assert server.requests == 1
    assert list(data_dir.iterdir()) == []


def test_enwik8_archive_without_member(tmp_path):
    sha = _enwik8_zip(tmp_path, b"x" * 100, member="other")
    with pytest.raises(ValueError, match="has no member named 'enwik8'"):
        prepare_enwik8(tmp_path, sha256=sha)
    assert not (tmp_path / "enwik8").exists()
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        prepare_enwik8(tmp_path)  # a stale archive that is not enwik8.zip


def _test_files_cifar10(root: Path, train: bool) -> CIFAR10:
    """torchvision's real CIFAR10 loader, pinned to the checksums of the files this test wrote."""
    folder = root / "cifar-10-batches-py"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    class TestFilesCIFAR10(CIFAR10):
        train_list = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
        test_list = [["test_batch", md5["test_batch"]]]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]}

    return TestFilesCIFAR10(str(root), train=train, download=False)


def test_cifar10_tokens_are_raster_order_subpixels(tmp_path):
    planar = make_cifar10_files(tmp_path, train_per_batch=3, test_images=4)  # (N, 3, 32, 32)
    test = ImageTokens(_test_files_cifar10(tmp_path, train=False).data, "cifar10/test")
    train = ImageTokens(_test_files_cifar10(tmp_path, train=True).data, "cifar10/train")
    assert (len(train), len(test)) == (15, 4)
    tokens = torch.cat(list(test.eval_batches(batch_size=3, seq_len=3072)))
    assert tokens.shape == (4, 3072)
    for i in range(4):
        for y, x, c in [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (5, 7, 2), (31, 31, 1)]:
            # token (y * 32 + x) * 3 + c is channel c of pixel (y, x): R, G, B interleaved pixel by pixel
            assert tokens[i, (y * 32 + x) * 3 + c] == planar[15 + i, c, y, x]


def test_cifar10_loader_checks_torchvision_checksums(tmp_path):
    make_cifar10_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="CIFAR10 not found or corrupted in"):
        load_cifar10(tmp_path, "train", download=False)  # not the real CIFAR10 files
    with pytest.raises(FileNotFoundError, match="CIFAR10 not found or corrupted"):
        load_cifar10(tmp_path / "empty", "test", download=False)
    with pytest.raises(ValueError, match="splits train and test, not 'val'"):
        load_cifar10(tmp_path, "val", download=False)


def test_augmentation_flips_and_shifts_each_image():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8))
    images[0] = 3  # near the clipping bounds
    images[1] = 250
    out = augment_images(images, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    flips, shifts = [], []
    assert out[0].unique().numel() == 1 and 0 <= int(out[0, 0, 0, 0]) <= 13  # 3 + shift, clipped at 0
    assert out[1].unique().numel() == 1 and 240 <= int(out[1, 0, 0, 0]) <= 255  # 250 + shift, clipped at 255
    for src, dst in zip(images[2:].int(), out[2:].int()):
        candidates = []
        for flipped, ref in ((False, src), (True, src.flip(1))):
            inside = (ref >= 10) & (ref <= 245)  # where no shift in [-10, 10] clips
            diff = (dst - ref)[inside]
            if (diff == diff[0]).all():
                candidates.append((flipped, int(diff[0]), ref))
        if len(candidates) == 0:
            pytest.fail("an augmented image is neither a shifted copy nor a shifted mirror of its source")
        flipped, shift, ref = candidates[0]
        assert -10 <= shift <= 10
        assert torch.equal(dst, (ref + shift).clamp(0, 255))
        flips.append(flipped)
        shifts.append(shift)
    assert 150 < sum(flips) < 250  # about half the images are mirrored
    assert set(shifts) == set(range(-10, 11))
    assert torch.equal(out, augment_images(images, torch.Generator().manual_seed(0)))


def test_image_training_batches_cover_each_epoch_and_augment(tmp_path):
    images = torch.from_numpy(np.random.default_rng(1).integers(20, 230, (10, 32, 32, 3), dtype=np.uint8))
    plain = ImageTokens(images, "x")
    seen = torch.cat([plain.train_batch(step, 5, 3072, seed=0) for step in range(2)])
    flat = images.reshape(10, -1)
    order = [next(j for j in range(10) if torch.equal(row, flat[j])) for row in seen]
    assert sorted(order) == list(range(10))  # one epoch = every image exactly once
    assert torch.equal(plain.train_batch(1, 5, 3072, seed=0), seen[5:])  # any step can be recomputed alone
    augmented = ImageTokens(images, "x", augment=True).train_batch(0, 5, 3072, seed=0)
    assert not torch.equal(augmented, seen[:5])
    with pytest.raises(ValueError, match="seq_len=3072"):
        plain.train_batch(0, 2, 1024, seed=0)
    with pytest.raises(ValueError, match=r"shape \(N, 32, 32, 3\)"):
        ImageTokens(np.zeros((2, 3, 32, 32), np.uint8), "x")
