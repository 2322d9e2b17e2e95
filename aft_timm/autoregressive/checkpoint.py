"""Run directories and checkpoints.

A run directory holds `step-XXXXXXXX/` checkpoint directories and a `latest` file naming the newest complete one. A
checkpoint directory is a `save_pretrained` directory (config.json + model.safetensors, loadable with
`Decoder.from_pretrained`) plus `training_state.pt` (optimizer, scheduler, step; tensors and plain data only, read
with `torch.load(weights_only=True)`) and `train_config.json`. Each is written to a temporary directory that is
renamed into place before `latest` is atomically replaced, so an interrupted run always leaves a complete checkpoint.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from .._io import write_atomic
from .model import Decoder, DecoderConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
LATEST_FILE = "latest"
HUB_PREFIX = "hf-hub:"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def save_checkpoint(run_dir: str | os.PathLike, model: Decoder, training_state: dict[str, Any],
                    train_config: dict[str, Any], keep: int = 1) -> Path:
    """Writes checkpoint `step-<training_state['step']>` into `run_dir` and points `latest` at it.

    Older checkpoints beyond the newest `keep` are deleted afterwards.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{training_state['step']:08d}"
    for stale in run_dir.glob(".step-*.tmp-*"):  # left behind by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(train_config, indent=2, sort_keys=True))
        final = run_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(run_dir / LATEST_FILE, lambda f: f.write(f"{name}\n".encode()))
    for old in sorted(run_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory, or None when it has none."""
    pointer = Path(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory (its latest checkpoint) or a checkpoint directory itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / LATEST_FILE).exists():
        return latest_checkpoint(path)
    if path.is_dir() and (path / CONFIG_FILE).exists():
        return path
    raise CheckpointError(f"{path} is neither a run directory (with a '{LATEST_FILE}' file) nor a checkpoint "
                          f"directory (with {CONFIG_FILE} and {WEIGHTS_FILE})")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"corrupt {path}: expected a JSON object")
    return data


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> Decoder:
    """Loads a model from a run directory, a checkpoint / `save_pretrained` directory, or `hf-hub:owner/name`."""
    if str(path).startswith(HUB_PREFIX):
        return Decoder.from_pretrained(str(path)[len(HUB_PREFIX) :], map_location=str(device))
    ckpt = resolve_checkpoint(path)
    fields = _read_json(ckpt / CONFIG_FILE)
    try:
        config = DecoderConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"invalid model config in {ckpt / CONFIG_FILE}: {err}") from err
    model = Decoder(config).to(device)
    load_weights(model, ckpt, device)
    return model.eval()


def load_weights(model: Decoder, ckpt: Path, device: torch.device | str = "cpu") -> None:
    """Loads `ckpt/model.safetensors` into `model`, which must match it exactly."""
    weights = ckpt / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"missing {WEIGHTS_FILE} in {ckpt}")
    try:
        state = safetensors.torch.load_file(weights, device=str(device))
    except (safetensors.SafetensorError, OSError) as err:
        raise CheckpointError(f"corrupt weights file {weights}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {weights} do not match the model: {err}") from err


def load_training_state(ckpt: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The optimizer / scheduler / step state of a checkpoint directory (read with weights_only=True)."""
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"missing {STATE_FILE} in {ckpt}: not a training checkpoint")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError) for bad files
        raise CheckpointError(f"corrupt training state {path}: {err}") from err


def load_train_config(ckpt: Path) -> dict[str, Any]:
    return _read_json(ckpt / TRAIN_CONFIG_FILE)
