"""Hub weights for aft models, tested with the real huggingface_hub client against a local Hub (tests/local_hub.py).

The client side runs in a child process (tests/hub_worker.py) started with HF_ENDPOINT pointing at the local
server: huggingface_hub reads the endpoint once, at import, and timm imports it early, so the test process itself
never talks to the Hub. Each test passes its own ``cache_dir`` so tests do not share cache state.
"""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_worker import HubWorker, WorkerError  # noqa: E402
from local_hub import LocalHub  # noqa: E402

import aft_timm  # noqa: E402,F401  (registers the aft models in this process too)
from aft_timm import hub as aft_hub  # noqa: E402

DEIT_TINY_REPO = "timm/deit_tiny_patch16_224.fb_in1k"
CONV_TINY = "aft_conv_tiny_h32_k11_patch16_224"
DIM = 192

WORKER_PRELUDE = """
import json, os, torch, timm
import aft_timm
from aft_timm import hub
from safetensors.torch import save_file

def dump(model, path):
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
"""


# ------------------------------------------------------------------------------------------------------ fixtures
def _safetensors_bytes(model: torch.nn.Module) -> bytes:
    return save({k: v.detach().contiguous() for k, v in model.state_dict().items()})


def _other_deit(deit_state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Another DeiT-tiny checkpoint (same keys and shapes, different values), faster than building a model."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in deit_state.items()}


@pytest.fixture(scope="module")
def deit_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224")
    return {k: v.detach().clone() for k, v in deit.state_dict().items()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, deit_state: dict[str, torch.Tensor]):
    with LocalHub(tmp_path_factory.mktemp("hub-server")) as server:
        config = {"architecture": "deit_tiny_patch16_224", "num_classes": 1000, "pretrained_cfg": {}}
        server.upload(DEIT_TINY_REPO, {"model.safetensors": save(deit_state), "config.json": json.dumps(config)})
        yield server


@pytest.fixture(scope="module")
def worker(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory):
    with HubWorker(hub.url, tmp_path_factory.mktemp("worker") / "hf_home") as w:
        w.run(WORKER_PRELUDE)
        yield w


@pytest.fixture(scope="module")
def offline_worker(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory):
    with HubWorker(hub.url, tmp_path_factory.mktemp("offline") / "hf_home", offline=True) as w:
        w.run(WORKER_PRELUDE)
        yield w


def _run(worker: HubWorker, code: str, **values):
    try:
        return worker.run(code, **values)
    except WorkerError as e:
        raise AssertionError(f"{e}\n{e.trace}") from None


def _same_carried_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two warm-started models agree on everything taken from the checkpoint (the rest is random init)."""
    fresh = re.compile(r"token_mixer\.(weight|gamma|beta)$|^(pos_embed|cls_token)$")
    same = all(torch.equal(a[k], b[k]) for k in a if not fresh.search(k) and ".qkv." not in k)
    return same and all(torch.equal(a[k][-DIM:], b[k][-DIM:]) for k in a if ".qkv." in k)


def _load_error(worker: HubWorker, code: str, **values) -> WorkerError:
    with pytest.raises(WorkerError) as info:
        worker.run(code, **values)
    return info.value


def _cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() or p.is_symlink()) if cache.exists() else []


def _assert_nothing_half_written(cache: Path) -> None:
    leftovers = [p for p in _cache_files(cache) if p.name.endswith(".incomplete")]
    assert not leftovers, f"partial downloads left in the cache: {leftovers}"
    for blob in cache.glob("models--*/blobs/*"):
        raise AssertionError(f"unexpected blob in the cache: {blob}")


# -------------------------------------------------------------------------------------------- DeiT warm start
def _assert_deit_warm_start(weights: dict[str, torch.Tensor], deit: dict[str, torch.Tensor], depth: int = 12) -> None:
    """Check the paper's Table 8 rule independently of the converter: what is carried and what is left."""
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias", "head.weight",
                "head.bias"):
        torch.testing.assert_close(weights[key], deit[key], rtol=0, atol=0, msg=key)
    for i in range(depth):
        for part in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias"):
            torch.testing.assert_close(weights[f"blocks.{i}.{part}"], deit[f"blocks.{i}.{part}"], rtol=0, atol=0)
        for part in ("weight", "bias"):
            torch.testing.assert_close(weights[f"blocks.{i}.token_mixer.proj.{part}"],
                                       deit[f"blocks.{i}.attn.proj.{part}"], rtol=0, atol=0)
            qkv, deit_qkv = weights[f"blocks.{i}.token_mixer.qkv.{part}"], deit[f"blocks.{i}.attn.qkv.{part}"]
            torch.testing.assert_close(qkv[-DIM:], deit_qkv[2 * DIM:], rtol=0, atol=0)  # values carried
            if part == "weight":  # queries left at initialization (the biases start at zero in both)
                assert not torch.equal(qkv[:DIM], deit_qkv[:DIM]), f"block {i}: query rows were copied"


def test_deit_warm_start_tag_downloads_and_converts(worker, hub, deit_state, tmp_path):
    hub.clear_log()
    _run(worker, """
model = hub.create_model(name, pretrained=True, cache_dir=cache)
dump(model, out)
result = model.pretrained_cfg['hf_hub_id']
""", name=f"{CONV_TINY}.deit_in1k_init", cache=str(tmp_path / "cache"), out=str(tmp_path / "w.safetensors"))
    weights = load_file(tmp_path / "w.safetensors")
    _assert_deit_warm_start(weights, deit_state)
    for i in range(12):  # AFT-conv position terms start at zero: every layer begins as AFT-simple
        assert not weights[f"blocks.{i}.token_mixer.gamma"].any() and not weights[f"blocks.{i}.token_mixer.beta"].any()
    assert hub.count("HEAD", "hub", f"/{DEIT_TINY_REPO}/resolve/main/model.safetensors") == 1
    assert hub.count("GET", "cdn") == 1


def test_deit_warm_start_is_the_default_tag_of_aft_simple(worker, deit_state, tmp_path):
    _run(worker, """
model = timm.create_model('aft_simple_tiny_patch16_224', pretrained=True, cache_dir=cache)
dump(model, out)
""", cache=str(tmp_path / "cache"), out=str(tmp_path / "w.safetensors"))
    weights = load_file(tmp_path / "w.safetensors")
    _assert_deit_warm_start(weights, deit_state)
    assert weights["pos_embed"].shape == deit_state["pos_embed"].shape
    assert not torch.equal(weights["pos_embed"], deit_state["pos_embed"])  # left at initialization (paper)
    assert not torch.equal(weights["cls_token"], deit_state["cls_token"])


def test_warm_start_with_new_head_for_own_classes(worker, deit_state, tmp_path):
    shapes = _run(worker, """
model = timm.create_model(name, pretrained=True, num_classes=5, cache_dir=cache)
dump(model, out)
result = list(model.head.weight.shape)
""", name=f"{CONV_TINY}.deit_in1k_init", cache=str(tmp_path / "cache"), out=str(tmp_path / "w.safetensors"))
    assert shapes == [5, DIM]
    weights = load_file(tmp_path / "w.safetensors")
    torch.testing.assert_close(weights["blocks.3.mlp.fc1.weight"], deit_state["blocks.3.mlp.fc1.weight"])


# --------------------------------------------------------------------------------------------------- caching
def test_second_load_reuses_the_cache_and_a_new_commit_is_fetched(worker, hub, deit_state, tmp_path):
    repo = "cache-test/deit-tiny"
    hub.upload(repo, {"model.safetensors": save(_other_deit(deit_state, 1))})
    hub.clear_log()
    load = """
model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=repo), cache_dir=cache)
dump(model, out)
"""
    values = dict(name=f"{CONV_TINY}.deit_in1k_init", repo=repo, cache=str(tmp_path / "cache"))
    _run(worker, load, out=str(tmp_path / "a.safetensors"), **values)
    _run(worker, load, out=str(tmp_path / "b.safetensors"), **values)
    assert hub.count("GET", "cdn") == 1, hub.requests  # the blob is downloaded once
    assert hub.count("HEAD", "hub", f"/{repo}/resolve/main/model.safetensors") == 2  # the ref is revalidated
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert _same_carried_weights(a, b)

    second = _other_deit(deit_state, 2)
    hub.upload(repo, {"model.safetensors": save(second)})
    _run(worker, load, out=str(tmp_path / "c.safetensors"), **values)
    assert hub.count("GET", "cdn") == 2
    c = load_file(tmp_path / "c.safetensors")
    torch.testing.assert_close(c["blocks.0.mlp.fc1.weight"], second["blocks.0.mlp.fc1.weight"], rtol=0, atol=0)
    assert len(list((tmp_path / "cache").glob("models--cache-test--deit-tiny/blobs/*"))) == 2


def test_offline_mode_uses_a_warm_cache_and_explains_a_cold_one(worker, offline_worker, hub, tmp_path):
    cache = str(tmp_path / "cache")
    name = f"{CONV_TINY}.deit_in1k_init"
    _run(worker, "dump(timm.create_model(name, pretrained=True, cache_dir=cache), out)",
         name=name, cache=cache, out=str(tmp_path / "online.safetensors"))
    hub.clear_log()
    _run(offline_worker, "dump(hub.create_model(name, pretrained=True, cache_dir=cache), out)",
         name=name, cache=cache, out=str(tmp_path / "offline.safetensors"))
    assert hub.requests == []  # not a single request in offline mode
    online, offline = load_file(tmp_path / "online.safetensors"), load_file(tmp_path / "offline.safetensors")
    assert _same_carried_weights(online, offline)

    cold = tmp_path / "cold"
    error = _load_error(offline_worker, "hub.create_model(name, pretrained=True, cache_dir=cache)",
                        name=name, cache=str(cold))
    assert error.type_name == "aft_timm.hub.ModelLoadError"
    assert DEIT_TINY_REPO in error.message and "not in the local cache" in error.message
    assert "HF_HUB_OFFLINE" in error.message
    assert hub.requests == []
    _assert_nothing_half_written(cold)


# --------------------------------------------------------------------------------------------------- failures
def test_missing_repo(worker, tmp_path):
    cache = tmp_path / "cache"
    code = "hub.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='nobody/missing'), " \
           "cache_dir=cache)"
    error = _load_error(worker, code, name=f"{CONV_TINY}.deit_in1k_init", cache=str(cache))
    assert error.type_name == "aft_timm.hub.ModelLoadError"
    assert "repository 'nobody/missing' was not found" in error.message
    plain = _load_error(worker, code.replace("hub.create_model", "timm.create_model"),
                        name=f"{CONV_TINY}.deit_in1k_init", cache=str(cache))
    assert "huggingface_hub.errors.RepositoryNotFoundError" in plain.types  # plain timm: the library's error
    hf_error = _load_error(worker, "hub.create_model('hf-hub:nobody/missing', pretrained=True, cache_dir=cache)",
                           cache=str(cache))
    assert "repository 'nobody/missing' was not found" in hf_error.message
    _assert_nothing_half_written(cache)


def test_missing_weights_file_and_missing_config(worker, hub, tmp_path):
    hub.upload("empty/weights", {"README.md": "no weights here\n", "config.json": json.dumps(
        {"architecture": CONV_TINY, "num_classes": 1000, "pretrained_cfg": {}})})
    cache = tmp_path / "cache"
    error = _load_error(worker, "hub.create_model(name, pretrained=True, "
                                "pretrained_cfg_overlay=dict(hf_hub_id='empty/weights'), cache_dir=cache)",
                        name=f"{CONV_TINY}.deit_in1k_init", cache=str(cache))
    assert "has no weights file: looked for model.safetensors and pytorch_model.bin" in error.message
    hub.upload("empty/noconfig", {"model.safetensors": b"x"})
    error = _load_error(worker, "hub.create_model('hf-hub:empty/noconfig', pretrained=True, cache_dir=cache)",
                        cache=str(cache))
    assert "has no config.json" in error.message
    _assert_nothing_half_written(cache)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_on_the_hub(worker, hub, deit_state, tmp_path, damage):
    good = save(deit_state)
    bad = good[: len(good) // 2] if damage == "truncated" else b"\xff" * 64 + good[64:1000]
    repo = f"corrupt/{damage}"
    hub.upload(repo, {"model.safetensors": bad})
    cache = tmp_path / "cache"
    error = _load_error(worker, "hub.create_model(name, pretrained=True, "
                                "pretrained_cfg_overlay=dict(hf_hub_id=repo), cache_dir=cache)",
                        name=f"{CONV_TINY}.deit_in1k_init", repo=repo, cache=str(cache))
    assert error.type_name == "aft_timm.hub.ModelLoadError"
    assert f"Hub repo '{repo}'" in error.message and "not a valid safetensors file" in error.message
    # the cache holds exactly what the Hub serves (a complete download of a bad file), nothing partial
    blobs = list(cache.glob(f"models--corrupt--{damage}/blobs/*"))
    assert len(blobs) == 1 and blobs[0].read_bytes() == bad
    assert str(blobs[0]) in error.message  # the message says which cached file to delete
    assert not [p for p in _cache_files(cache) if p.name.endswith(".incomplete")]


def test_interrupted_download_resumes_with_a_range_request(worker, hub, deit_state, tmp_path):
    repo = "flaky/deit-tiny"
    content = save(_other_deit(deit_state, 3))
    cut = len(content) * 3 // 4
    hub.add_fault(hub.sha256(content), "drop", nbytes=cut)  # the connection breaks after 3/4 of the file
    hub.upload(repo, {"model.safetensors": content})
    hub.clear_log()
    _run(worker, "dump(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=repo), "
                 "cache_dir=cache), out)",
         name=f"{CONV_TINY}.deit_in1k_init", repo=repo, cache=str(tmp_path / "cache"),
         out=str(tmp_path / "w.safetensors"))
    ranges = [r.range for r in hub.requests if r.origin == "cdn"]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", ranges[1])[1])  # the client asks only for what it lacks
    assert 0 < resumed_at <= cut
    blob = next((tmp_path / "cache").glob("models--flaky--deit-tiny/blobs/*"))
    assert blob.read_bytes() == content


def test_truncated_transfer_leaves_nothing_in_the_cache(worker, hub, deit_state, tmp_path):
    repo = "short/deit-tiny"
    content = save(_other_deit(deit_state, 4))
    hub.upload(repo, {"model.safetensors": content})
    hub.add_fault(hub.sha256(content), "short", nbytes=len(content) // 3)
    cache = tmp_path / "cache"
    code = "dump(hub.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=repo), " \
           "cache_dir=cache), out)"
    values = dict(name=f"{CONV_TINY}.deit_in1k_init", repo=repo, cache=str(cache), out=str(tmp_path / "w.st"))
    error = _load_error(worker, code, **values)
    assert error.type_name == "aft_timm.hub.ModelLoadError"
    assert "download was incomplete" in error.message and "nothing was kept in the cache" in error.message
    _assert_nothing_half_written(cache)
    assert not list(cache.glob("models--short--deit-tiny/snapshots/*/*"))
    _run(worker, code, **values)  # the fault was transient: the next try downloads the whole file
    assert next(cache.glob("models--short--deit-tiny/blobs/*")).read_bytes() == content


def test_config_naming_an_unregistered_architecture(worker, hub, tmp_path):
    config = {"architecture": "aft_mega_h64_k31_patch16_224", "num_classes": 1000, "pretrained_cfg": {}}
    hub.upload("future/aft-mega", {"config.json": json.dumps(config), "model.safetensors": save(
        {"w": torch.zeros(1)})})
    cache = tmp_path / "cache"
    plain = _load_error(worker, "timm.create_model('hf-hub:future/aft-mega', pretrained=True, cache_dir=cache)",
                        cache=str(cache))
    assert plain.message == "Unknown model (aft_mega_h64_k31_patch16_224)"  # what timm alone says
    error = _load_error(worker, "hub.create_model('hf-hub:future/aft-mega', pretrained=True, cache_dir=cache)",
                        cache=str(cache))
    assert "config.json of Hub repo 'future/aft-mega' names architecture 'aft_mega_h64_k31_patch16_224'" in \
        error.message
    assert "not registered" in error.message and CONV_TINY in error.message
    cached = [p.name for p in cache.glob("models--future--aft-mega/snapshots/*/*")]
    assert cached == ["config.json"]  # the weights are never fetched for an unknown architecture


def test_checkpoint_that_does_not_fit_the_model(worker, hub, tmp_path):
    torch.manual_seed(5)
    narrow_vit = timm.models.VisionTransformer(embed_dim=96, depth=12, num_heads=3)
    hub.upload("misfit/vit-96", {"model.safetensors": _safetensors_bytes(narrow_vit)})
    cache = tmp_path / "cache"
    error = _load_error(worker, "hub.create_model(name, pretrained=True, "
                                "pretrained_cfg_overlay=dict(hf_hub_id='misfit/vit-96'), cache_dir=cache)",
                        name=f"{CONV_TINY}.deit_in1k_init", cache=str(cache))
    assert error.type_name == "aft_timm.hub.ModelLoadError"
    assert "Hub repo 'misfit/vit-96'" in error.message and "does not fit" in error.message

    # an AFT checkpoint of another configuration (192 heads) under a config.json that says 32 heads
    torch.manual_seed(6)
    other = timm.create_model("aft_conv_tiny_h192_k11_patch16_224")
    config = {"architecture": CONV_TINY, "num_classes": 1000, "pretrained_cfg": {}}
    hub.upload("misfit/aft", {"config.json": json.dumps(config), "model.safetensors": _safetensors_bytes(other)})
    error = _load_error(worker, "hub.create_model('hf-hub:misfit/aft', pretrained=True, cache_dir=cache)",
                        cache=str(cache))
    assert f"the weights from Hub repo 'misfit/aft' do not fit the model ({CONV_TINY})" in error.message
    assert "blocks.0.token_mixer.weight" in error.message and "torch.Size([192, 11, 11])" in error.message


# ----------------------------------------------------------------------------------------------- round trips
def test_push_to_hub_then_load_with_plain_timm(worker, hub, tmp_path):
    outputs = _run(worker, """
torch.manual_seed(0)
model = timm.create_model('aft_full_tiny_patch16_224', img_size=64, num_classes=7).eval()
commit = hub.push_to_hub(model, 'alice/aft-full-tiny-64')
loaded = timm.create_model('hf-hub:alice/aft-full-tiny-64', pretrained=True, cache_dir=cache).eval()
x = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    y = loaded(x)
    result = [commit, bool(torch.equal(model(x), y)), list(y.shape), loaded.pretrained_cfg['input_size']]
""", cache=str(tmp_path / "cache"))
    commit, identical, shape, input_size = outputs
    assert commit.startswith(f"{hub.url}/alice/aft-full-tiny-64/commit/")
    assert identical and shape == [2, 7] and input_size == [3, 64, 64]
    files = hub.files("alice/aft-full-tiny-64")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]  # no pickle is published
    config = json.loads(files["config.json"])
    assert config["architecture"] == "aft_full_tiny_patch16_224"
    assert config["model_args"]["img_size"] == [64, 64] and config["num_classes"] == 7
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: timm" in card
    assert "arXiv:2105.14103" in card and "An Attention Free Transformer" in card
    assert "timm.create_model('hf-hub:alice/aft-full-tiny-64', pretrained=True)" in card

    # pushing again keeps the README and commits the new weights
    same = _run(worker, """
torch.manual_seed(1)
model = timm.create_model('aft_full_tiny_patch16_224', img_size=64, num_classes=7).eval()
hub.push_to_hub(model, 'alice/aft-full-tiny-64', commit_message='retrained')
loaded = timm.create_model('hf-hub:alice/aft-full-tiny-64', pretrained=True, cache_dir=cache).eval()
x = torch.randn(1, 3, 64, 64)
with torch.no_grad():
    result = bool(torch.equal(model(x), loaded(x)))
""", cache=str(tmp_path / "cache"))
    assert same and hub.files("alice/aft-full-tiny-64")["README.md"].decode() == card


def test_save_pretrained_local_dir_and_hub_round_trip(worker, hub, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(CONV_TINY, num_classes=3).eval()
    folder = aft_hub.save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert torch.equal(_reference_output(loaded), _reference_output(model))
    assert "arXiv:2105.14103" in (folder / "README.md").read_text()

    hub.upload_folder("bob/aft-conv-tiny", folder)
    _run(worker, """
loaded = timm.create_model('hf-hub:bob/aft-conv-tiny', pretrained=True, cache_dir=cache).eval()
torch.manual_seed(0)
x = torch.randn(2, 3, 96, 128)
with torch.no_grad():
    torch.save(loaded(x), out)
""", cache=str(tmp_path / "cache"), out=str(tmp_path / "out.pt"))
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), _reference_output(model))
    assert not list(folder.glob(".aft-save-*"))  # the staging folder is gone


def _reference_output(model: torch.nn.Module) -> torch.Tensor:
    """The model's output on a fixed non-square input (AFT-conv runs at any size divisible by the patch)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        return model(x)


class _Exploit:
    """Unpickling this calls ``open(marker, 'w')``: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_checkpoints_are_read_with_weights_only(worker, hub, tmp_path):
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "evil": _Exploit(str(marker))}, payload)
    config = {"architecture": CONV_TINY, "num_classes": 1000, "pretrained_cfg": {}}
    hub.upload("mallory/aft", {"config.json": json.dumps(config), "pytorch_model.bin": payload.getvalue()})
    error = _load_error(worker, "hub.create_model('hf-hub:mallory/aft', pretrained=True, cache_dir=cache)",
                        cache=str(tmp_path / "cache"))
    assert "refused to load the pickle weights file" in error.message and "weights_only=True" in error.message
    assert not marker.exists()

    local = tmp_path / "mallory"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(config))
    (local / "pytorch_model.bin").write_bytes(payload.getvalue())
    with pytest.raises(aft_hub.ModelLoadError, match="refused to load the pickle weights file"):
        aft_hub.create_model(f"local-dir:{local}", pretrained=True)
    assert not marker.exists()

    # a plain tensor pickle (what timm.models.save_for_hf writes by default) still loads
    torch.manual_seed(0)
    model = timm.create_model(CONV_TINY).eval()
    timm.models.save_for_hf(model, tmp_path / "pickled", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "pickled").iterdir()) == ["config.json", "pytorch_model.bin"]
    loaded = aft_hub.create_model(f"local-dir:{tmp_path / 'pickled'}", pretrained=True).eval()
    assert torch.equal(_reference_output(loaded), _reference_output(model))


def test_every_aft_model_exports_a_json_config(tmp_path):
    for name in timm.list_models("aft_*"):
        model = timm.create_model(name, device="meta")
        timm.models._hub.save_config_for_hf(model, tmp_path / f"{name}.json")
        config = json.loads((tmp_path / f"{name}.json").read_text())
        assert config["architecture"] == name
        assert config["pretrained_cfg"]["paper_ids"] == "arXiv:2105.14103"


def test_conversion_report_is_readable(deit_state):
    model = timm.create_model(CONV_TINY)
    converted, report = aft_hub.convert_deit(deit_state, model)
    model.load_state_dict(converted)
    text = aft_hub.format_conversion_report(report)
    assert "  blocks.{0..11}.token_mixer.qkv.weight[v]" in text
    assert "  blocks.{0..11}.token_mixer.qkv.weight[q,k]" in text
    assert text.splitlines()[0] == f"carried over from the checkpoint ({len(report['carried'])} entries):"
    dropped = text[text.index("checkpoint entries not used"):]
    assert "cls_token" in dropped and "pos_embed" in dropped


def test_plain_unknown_model_name(tmp_path):
    with pytest.raises(aft_hub.ModelLoadError, match=r"unknown model 'aft_conv_tiny_h32_k11_patch16'.*Close names"):
        aft_hub.create_model("aft_conv_tiny_h32_k11_patch16")
    with pytest.raises(RuntimeError, match=r"Unknown model"):
        timm.create_model("aft_conv_tiny_h32_k11_patch16")
