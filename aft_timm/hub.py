"""Hugging Face Hub helpers for aft-timm models.

Thin layers over timm's own Hub support (``timm.models.save_for_hf`` / ``push_to_hf_hub`` / ``create_model``):

- :func:`save_pretrained` and :func:`push_to_hub` write timm's Hub layout (``model.safetensors``, ``config.json``)
  plus a model card that cites the AFT paper (arXiv:2105.14103); the result loads back with
  ``timm.create_model('hf-hub:org/repo', pretrained=True)`` or ``'local-dir:/path'`` once ``aft_timm`` is imported.
- :func:`create_model` is ``timm.create_model`` with the errors a user meets when loading weights (missing repo or
  file, offline cache miss, corrupt or truncated file, refused pickle, unknown architecture, weights of the wrong
  shape) turned into a :class:`ModelLoadError` that names the source and says what to do.
- :func:`convert_deit` converts a timm ViT/DeiT state dict for an AFT model (the warm start of the paper's Table 8),
  and :func:`format_conversion_report` prints what was carried over and what was left at initialization.
"""
from __future__ import annotations

import difflib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from timm.models import push_to_hf_hub, save_for_hf
from timm.models._hub import generate_readme  # the card writer push_to_hf_hub uses; not re-exported by timm

from .models import aft_vit

__all__ = [
    "PAPER_ID", "PAPER_CITATION", "ModelLoadError", "model_card", "save_pretrained", "push_to_hub", "create_model",
    "convert_deit", "format_conversion_report",
]

PAPER_ID = "arXiv:2105.14103"
PAPER_URL = "https://arxiv.org/abs/2105.14103"
PAPER_CITATION = """@article{zhai2021attention,
  title={An Attention Free Transformer},
  author={Zhai, Shuangfei and Talbott, Walter and Srivastava, Nitish and Huang, Chen and Goh, Hanlin and
          Zhang, Ruixiang and Susskind, Josh},
  journal={arXiv preprint arXiv:2105.14103},
  year={2021}
}"""
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ModelLoadError(RuntimeError):
    """A model or its weights could not be loaded; the message names the source and the fix."""


# ----------------------------------------------------------------------------------------------------- saving
def model_card(
    model: torch.nn.Module,
    repo_id: str | None = None,
    description: str | None = None,
    dataset: str | None = None,
    license: str = "apache-2.0",  # noqa: A002 (the model card's field name)
) -> dict[str, Any]:
    """The model card fields timm's card writer takes, filled in for an AFT model.

    Args:
        model: The model being published.
        repo_id: Where it will live on the Hub; used in the usage snippet (a local folder is shown otherwise).
        description: A first paragraph; by default one naming the architecture and the paper.
        dataset: What the weights were trained on, e.g. ``"imagenet-1k"``.
        license: The weights' license (Hub identifier).
    """
    arch = model.pretrained_cfg.get("architecture", type(model).__name__)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    source = f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder"
    details: dict[str, Any] = {
        "Model Type": "Image classification / feature backbone",
        "Model Stats": {"Params (M)": f"{n_params:.1f}", "Image size": f"{input_size[-2]} x {input_size[-1]}"},
        "Papers": {"An Attention Free Transformer": PAPER_URL},
    }
    if dataset:
        details["Dataset"] = dataset
    return {
        "tags": ["image-classification", "timm", "aft-timm", "attention-free-transformer"],
        "license": license,
        "description": description or (
            f"`{arch}`: an Attention Free Transformer (AFT) image model from aft-timm, the implementation of "
            f"\"An Attention Free Transformer\" (Zhai et al., 2021, {PAPER_ID}) for timm."
        ),
        "details": details,
        "usage": (
            "```python\n"
            "import aft_timm  # registers the aft_* architectures with timm\n"
            "import timm\n\n"
            f"model = timm.create_model('{source}', pretrained=True).eval()\n"
            "data_config = timm.data.resolve_model_data_config(model)\n"
            "transform = timm.data.create_transform(**data_config, is_training=False)\n"
            "```"
        ),
        "citation": PAPER_CITATION,
    }


def save_pretrained(
    model: torch.nn.Module,
    save_directory: str | Path,
    card: Mapping[str, Any] | None = None,
    model_args: Mapping[str, Any] | None = None,
    data_config: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` in timm's Hub layout: ``model.safetensors``, ``config.json`` and a ``README.md`` model card.

    Every file is written to a temporary folder inside ``save_directory`` first and moved into place with
    ``os.replace``, so an interrupted save never leaves a half-written file. No pickle file is written.

    Args:
        model: A timm model (its ``pretrained_cfg`` and recorded factory arguments go to ``config.json``).
        save_directory: Created if needed; existing files of the same names are replaced.
        card: Model card fields (see :func:`model_card`); defaults to ``model_card(model)``.
        model_args: Extra JSON-serializable constructor arguments for ``config.json``.
        data_config: Preprocessing to record, e.g. ``{"input_size": (3, 384, 384)}``.

    Returns:
        The directory; ``timm.create_model(f"local-dir:{path}", pretrained=True)`` loads it back.
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".aft-save-", dir=save_directory))
    try:
        save_for_hf(model, staging, model_args=dict(model_args or {}), safe_serialization=True,
                    data_config=dict(data_config) if data_config else None)
        name = save_directory.resolve().name
        (staging / "README.md").write_text(generate_readme(dict(card or model_card(model)), name), encoding="utf-8")
        for path in sorted(staging.iterdir()):
            os.replace(path, save_directory / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return save_directory


def push_to_hub(
    model: torch.nn.Module,
    repo_id: str,
    commit_message: str = "Add model",
    token: str | None = None,
    revision: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    card: Mapping[str, Any] | None = None,
    model_args: Mapping[str, Any] | None = None,
    data_config: Mapping[str, Any] | None = None,
) -> str:
    """Upload ``model`` to the Hub with ``timm.models.push_to_hf_hub`` (safetensors only, AFT model card).

    The repo is created if needed. A ``README.md`` already in the repo is kept.

    Args:
        model: The model to publish.
        repo_id: ``"org/name"``.
        commit_message: The commit's summary.
        token: Hub token; by default the one saved by ``hf auth login`` or ``HF_TOKEN``.
        revision: Branch to commit to (default ``main``).
        private: Create the repo as private.
        create_pr: Open a pull request instead of committing to the branch.
        card: Model card fields (see :func:`model_card`); defaults to ``model_card(model, repo_id)``.
        model_args: Extra JSON-serializable constructor arguments for ``config.json``.
        data_config: Preprocessing to record in ``config.json``.

    Returns:
        The URL of the commit (or pull request).
    """
    return push_to_hf_hub(
        model, repo_id, commit_message=commit_message, token=token, revision=revision, private=private,
        create_pr=create_pr, model_card=dict(card or model_card(model, repo_id)),
        model_args=dict(model_args or {}), safe_serialization=True,
        data_config=dict(data_config) if data_config else None,
    )


# ---------------------------------------------------------------------------------------------------- loading
def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` with clear errors for the ways loading weights goes wrong.

    Takes the same arguments (model names with tags, ``hf-hub:org/repo``, ``local-dir:/path``,
    ``pretrained_cfg_overlay``, ``checkpoint_path``, ``cache_dir``, model keyword arguments).

    Raises:
        ModelLoadError: The repo, file, or cached copy is missing; the file is corrupt, truncated or an unsafe
            pickle; ``config.json`` names an unregistered architecture; or the weights do not fit the model. The
            original exception is chained as ``__cause__``.
    """
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except Exception as err:  # noqa: BLE001 (re-raised unchanged when there is nothing to add)
        message = _explain(err, model_name, pretrained, kwargs)
        if message is None:
            raise
        raise ModelLoadError(message) from err


def _weights_source(model_name: str, kwargs: Mapping[str, Any]) -> tuple[str, str | None]:
    """A readable description of where the weights of ``model_name`` come from, and the Hub repo if any."""
    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:"):].split("@")[0]
        return f"Hub repo '{repo}'", repo
    if model_name.startswith("local-dir:"):
        return f"local folder '{model_name[len('local-dir:'):]}'", None
    if kwargs.get("checkpoint_path"):
        return f"checkpoint file '{kwargs['checkpoint_path']}'", None
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError:
        cfg = None
    cfg_dict = dict(cfg.to_dict()) if cfg is not None else {}
    cfg_dict.update(kwargs.get("pretrained_cfg_overlay") or {})
    if cfg_dict.get("file"):
        return f"file '{cfg_dict['file']}' (pretrained weights of '{model_name}')", None
    if cfg_dict.get("hf_hub_id"):
        repo = cfg_dict["hf_hub_id"]
        return f"Hub repo '{repo}' (pretrained weights of '{model_name}')", repo
    if cfg_dict.get("url"):
        return f"URL '{cfg_dict['url']}' (pretrained weights of '{model_name}')", None
    return f"'{model_name}'", None


def _explain(err: Exception, model_name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> str | None:
    """A clear message for ``err``, or None to re-raise it as it is."""
    source, repo = _weights_source(model_name, kwargs)
    text = str(err)
    url = getattr(getattr(err, "response", None), "url", None)
    filename = _filename_from_url(str(url)) if url is not None else None
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return f"{source}: the requested revision does not exist on {hf_constants.ENDPOINT}. ({_first_line(err)})"
    if isinstance(err, hf_errors.RepositoryNotFoundError):
        return (f"{source}: repository '{repo}' was not found on {hf_constants.ENDPOINT}. Check the name; for a "
                f"private or gated repo, log in with `hf auth login` or set HF_TOKEN.")
    if isinstance(err, hf_errors.RemoteEntryNotFoundError):
        if filename == "config.json":
            return (f"{source} has no config.json, which 'hf-hub:' loading needs: upload the model with "
                    f"aft_timm.hub.push_to_hub (or timm.models.push_to_hf_hub).")
        return (f"{source} has no weights file: looked for {' and '.join(_WEIGHT_FILES)}"
                f"{f' (last tried: {filename})' if filename else ''}.")
    if isinstance(err, hf_errors.LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE
               else f"the Hub at {hf_constants.ENDPOINT} could not be reached")
        cache = kwargs.get("cache_dir") or hf_constants.HF_HUB_CACHE
        return (f"{source}: the files are not in the local cache ({cache}) and {why}. Run "
                f"once with network access (and HF_HUB_OFFLINE unset) to fill the cache.")
    if isinstance(err, OSError) and "Consistency check failed" in text:
        return (f"{source}: the download was incomplete ({_first_line(err)}); nothing was kept in the cache, "
                f"retry the download.")
    if isinstance(err, SafetensorError) or "Error while deserializing header" in text:
        return (f"{source}: the weights file is not a valid safetensors file (truncated or corrupt: {text}). "
                f"{_cache_hint(repo, 'model.safetensors', kwargs)}")
    if re.search(r"Weights only load failed|weights_only=True blocked", text):
        return (f"{source}: refused to load the pickle weights file: it holds Python objects other than tensors, "
                f"and aft_timm only reads pickles with torch.load(weights_only=True), which never runs code from "
                f"the file. Ask for a safetensors file (model.safetensors).")
    if isinstance(err, pickle.UnpicklingError) or "PytorchStreamReader failed" in text:
        return (f"{source}: the pickle weights file is truncated or corrupt ({_first_line(err)}). "
                f"{_cache_hint(repo, 'pytorch_model.bin', kwargs)}")
    if isinstance(err, json.JSONDecodeError):
        return f"{source}: config.json is not valid JSON ({err})."
    if isinstance(err, KeyError) and err.args == ("architecture",):
        return f"{source}: config.json has no 'architecture' field, so timm cannot tell which model to build."
    match = re.fullmatch(r"Unknown model \((.+)\)", text)
    if isinstance(err, RuntimeError) and match:
        return _unknown_model_message(match[1], model_name, source)
    if isinstance(err, ValueError) and pretrained and re.search(r"does not fit|must match", text):
        return f"the weights from {source} do not fit the model ({_arch_of(model_name, kwargs)}): {text}"
    if isinstance(err, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
        return (f"the weights from {source} do not fit the model ({_arch_of(model_name, kwargs)}): "
                f"{_summarize_state_dict_error(text)}. Check the model name and its keyword arguments "
                f"(num_classes, img_size, ...) against the checkpoint.")
    return None


def _unknown_model_message(arch: str, model_name: str, source: str) -> str:
    ours = sorted(timm.list_models(module="aft_vit"))
    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
    hint = f" Close names: {', '.join(close)}." if close else ""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return (f"config.json of {source} names architecture '{arch}', which is not registered in timm.{hint} "
                f"aft_timm registers: {', '.join(ours)}. If the repo needs a newer aft-timm or another package "
                f"that defines '{arch}', install and import it first.")
    return f"unknown model '{arch}'.{hint} aft_timm registers: {', '.join(ours)}."


def _arch_of(model_name: str, kwargs: Mapping[str, Any]) -> str:
    """The architecture behind ``model_name``; for ``hf-hub:``/``local-dir:``, the one its config.json names."""
    config = None
    if model_name.startswith("hf-hub:"):
        repo, _, revision = model_name[len("hf-hub:"):].partition("@")
        cached = try_to_load_from_cache(repo, "config.json", cache_dir=kwargs.get("cache_dir"),
                                        revision=revision or None)
        config = cached if isinstance(cached, str) else None
    elif model_name.startswith("local-dir:"):
        config = os.path.join(model_name[len("local-dir:"):], "config.json")
    if config is not None:
        try:
            with open(config, encoding="utf-8") as f:
                return str(json.load(f)["architecture"])
        except (OSError, ValueError, KeyError):
            pass
    return model_name


def _summarize_state_dict_error(text: str, limit: int = 5) -> str:
    problems = [line.strip().rstrip(".") for line in text.splitlines()[1:] if line.strip()]
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _filename_from_url(url: str) -> str | None:
    match = re.search(r"/resolve/[^/]+/(.+)$", url)
    return match[1] if match else None


def _cache_hint(repo: str | None, filename: str, kwargs: Mapping[str, Any]) -> str:
    if repo is None:
        return "Replace the file with a good copy."
    cached = try_to_load_from_cache(repo, filename, cache_dir=kwargs.get("cache_dir"))
    where = f" Cached copy: {os.path.realpath(cached)}." if isinstance(cached, str) else ""
    return (f"If the file on the Hub is fine, the cached copy is damaged: delete it (`hf cache delete`) and load "
            f"again.{where}")


# ------------------------------------------------------------------------------------------------- conversion
convert_deit = aft_vit.convert_vit_checkpoint

_REPORT_SECTIONS = (
    ("carried", "carried over from the checkpoint"),
    ("initialized", "left at the model's initialization"),
    ("dropped", "checkpoint entries not used"),
)


def format_conversion_report(report: Mapping[str, list[str]]) -> str:
    """A readable summary of a :func:`convert_deit` report, with per-block keys folded (``blocks.{0..11}.…``).

    Args:
        report: The report returned by :func:`convert_deit`.
    """
    lines = []
    for key, title in _REPORT_SECTIONS:
        names = report.get(key, [])
        lines.append(f"{title} ({len(names)} entries):")
        lines.extend(f"  {name}" for name in _fold_block_indices(names))
    return "\n".join(lines)


def _fold_block_indices(names: list[str]) -> list[str]:
    groups: dict[str, list[int]] = {}
    for name in names:
        match = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        pattern, index = (f"blocks.{{}}.{match[2]}", int(match[1])) if match else (name, -1)
        groups.setdefault(pattern, []).append(index)
    folded = []
    for pattern, indices in groups.items():
        if indices == [-1]:
            folded.append(pattern)
            continue
        indices = sorted(set(indices))
        contiguous = indices == list(range(indices[0], indices[-1] + 1))
        span = f"{{{indices[0]}..{indices[-1]}}}" if contiguous and len(indices) > 1 else (
            "{" + ",".join(map(str, indices)) + "}" if len(indices) > 1 else str(indices[0]))
        folded.append(pattern.format(span))
    return folded
