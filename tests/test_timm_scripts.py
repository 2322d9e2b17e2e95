"""train_imagenet.sh and aft_timm.run_timm, and timm's own scripts (train/validate/inference/benchmark) on aft models.

timm's scripts are in neither the timm wheel nor its PyPI source distribution. The tests that run them look for
them in TIMM_SCRIPTS_DIR, or in tests/.timm_upstream/scripts (filled by tests/hub_fetch_timm_scripts.py from a
pytorch-image-models checkout), and are skipped when neither has them. Everything else runs everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed.run as torchrun
from PIL import Image

import aft_timm  # noqa: F401  (registers the aft models in this process)
from aft_timm import run_timm

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO / "train_imagenet.sh"
MODEL = "aft_conv_tiny_h32_k11_patch16_224"
SCRIPT_NAMES = ("train.py", "validate.py", "inference.py", "benchmark.py")


def _find_scripts() -> Path | None:
    for candidate in (os.environ.get("TIMM_SCRIPTS_DIR"), REPO / "tests" / ".timm_upstream" / "scripts"):
        if candidate and all((Path(candidate) / name).is_file() for name in SCRIPT_NAMES):
            return Path(candidate)
    return None


SCRIPTS = _find_scripts()
needs_scripts = pytest.mark.skipif(
    SCRIPTS is None,
    reason="timm's train.py/validate.py/... are not in the timm wheel or sdist: set TIMM_SCRIPTS_DIR to a "
           "pytorch-image-models checkout or run tests/hub_fetch_timm_scripts.py --from <checkout>")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep), **extra)
    env.pop("TIMM_TRAIN_PY", None)
    return env


def _train_sh(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(["bash", str(TRAIN_SH), *args], cwd=cwd, env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


def _dry_run(*args: str, cwd: Path) -> list[str]:
    done = _train_sh("--dry-run", *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return shlex.split(lines[0])


def _script_args(cmd: list[str]) -> list[str]:
    """The arguments after train.py."""
    index = next(i for i, part in enumerate(cmd) if part.endswith("train.py"))
    return cmd[index + 1:]


def _flags(args: list[str]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    current = None
    for part in args:
        if part.startswith("--"):
            current = part
            flags[current] = []
        else:
            assert current is not None, args
            flags[current].append(part)
    return flags


DEIT_RECIPE = {
    "--device-modules": ["aft_timm"], "--opt": ["adamw"], "--weight-decay": ["0.05"], "--lr-base": ["5e-4"],
    "--lr-base-size": ["512"], "--lr-base-scale": ["linear"], "--sched": ["cosine"], "--warmup-epochs": ["5"],
    "--smoothing": ["0.1"], "--drop-path": ["0.1"], "--aa": ["rand-m9-mstd0.5-inc1"], "--mixup": ["0.8"],
    "--cutmix": ["1.0"], "--reprob": ["0.25"], "--model-ema": [], "--amp": [],
}


# ------------------------------------------------------------------------------------- train_imagenet.sh --dry-run
def test_dry_run_one_gpu_runs_train_py_directly(tmp_path):
    cmd = _dry_run("--gpus", "1", "--timm-dir", "/opt/pim", cwd=tmp_path)
    assert cmd[:2] == [sys.executable, "/opt/pim/train.py"]
    flags = _flags(_script_args(cmd))
    assert {k: flags[k] for k in DEIT_RECIPE} == DEIT_RECIPE
    assert flags["--model"] == ["aft_conv_small_h384_k11_patch16_224"] and flags["--epochs"] == ["300"]
    assert flags["--batch-size"] == ["128"] and flags["--output"] == ["./output"]
    assert "--aug-repeats" not in flags  # timm supports repeated augmentation only with several processes


def test_dry_run_one_node_several_gpus(tmp_path):
    cmd = _dry_run("--gpus", "4", "--model", MODEL, "--data-dir", "/data/in1k", "--batch-size", "256",
                   "--epochs", "30", "--output", "/runs/x", cwd=tmp_path)
    assert cmd[0] == "torchrun"
    launch = torchrun.get_args_parser().parse_args(cmd[1:])  # torchrun's own parser
    assert launch.standalone and launch.nnodes == "1" and launch.nproc_per_node == "4"
    assert launch.training_script == "./pytorch-image-models/train.py"
    flags = _flags(launch.training_script_args)
    assert flags["--model"] == [MODEL] and flags["--data-dir"] == ["/data/in1k"] and flags["--output"] == ["/runs/x"]
    assert flags["--batch-size"] == ["256"] and flags["--epochs"] == ["30"] and flags["--aug-repeats"] == ["3"]
    assert {k: flags[k] for k in DEIT_RECIPE} == DEIT_RECIPE


def test_dry_run_several_nodes(tmp_path):
    cmd = _dry_run("--gpus", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.7",
                   "--master-port", "29511", "--data-dir", "/d", "--", "--grad-accum-steps", "2", cwd=tmp_path)
    assert cmd[0] == "torchrun"
    launch = torchrun.get_args_parser().parse_args(cmd[1:])
    assert not launch.standalone
    assert (launch.nnodes, launch.node_rank, launch.nproc_per_node) == ("2", 1, "8")
    assert (launch.master_addr, launch.master_port) == ("10.0.0.7", 29511)
    flags = _flags(launch.training_script_args)
    assert flags["--grad-accum-steps"] == ["2"]  # arguments after -- reach train.py unchanged, last
    assert launch.training_script_args[-2:] == ["--grad-accum-steps", "2"]


def test_dry_run_recipes_for_fine_tuning(tmp_path):
    flags = _flags(_script_args(_dry_run("--recipe", "finetune384", "--gpus", "1", cwd=tmp_path)))
    assert flags["--model"] == ["aft_conv_base_h32_k25_patch16_384"] and "--pretrained" in flags
    assert flags["--epochs"] == ["100"] and flags["--batch-size"] == ["64"]
    custom = _flags(_script_args(_dry_run("--model", "aft_conv_tiny_h192_k11_patch16_224", "--pretrained",
                                          "--num-classes", "5", "--gpus", "1", "--data-dir", "~/flowers",
                                          cwd=tmp_path)))
    assert custom["--num-classes"] == ["5"] and "--pretrained" in custom and custom["--data-dir"] == ["~/flowers"]


def test_clear_errors(tmp_path):
    missing = _train_sh("--gpus", "1", cwd=tmp_path)
    assert missing.returncode == 2
    assert "timm's train.py was not found at './pytorch-image-models/train.py'" in missing.stderr
    assert "git clone" in missing.stderr and "--timm-dir" in missing.stderr and "TIMM_TRAIN_PY" in missing.stderr
    warned = _train_sh("--dry-run", "--gpus", "1", cwd=tmp_path)
    assert warned.returncode == 0 and "warning: timm's train.py was not found" in warned.stderr

    (tmp_path / "pim").mkdir()
    (tmp_path / "pim" / "train.py").write_text("raise SystemExit('must not run')\n")
    no_data = _train_sh("--gpus", "1", "--timm-dir", "pim", "--data-dir", "nowhere", cwd=tmp_path)
    assert no_data.returncode == 2 and "data directory 'nowhere' does not exist" in no_data.stderr
    (tmp_path / "data" / "train").mkdir(parents=True)
    no_val = _train_sh("--gpus", "1", "--timm-dir", "pim", "--data-dir", "data", cwd=tmp_path)
    assert no_val.returncode == 2 and "no val/ (or validation/) folder" in no_val.stderr

    for args, message in [
        (["--model", "resnet50"], "'resnet50' is not an aft-timm model"),
        (["--epochs"], "--epochs needs a value"),
        (["--gpus", "two"], "--gpus must be a non-negative integer"),
        (["--nnodes", "2", "--node-rank", "2"], "--node-rank 2 must be < --nnodes 2"),
        (["--recipe", "imagenet21k"], "unknown --recipe 'imagenet21k'"),
        (["--lr", "1e-3"], "unknown option '--lr' (train.py options go after '--'"),
    ]:
        done = _train_sh("--dry-run", *args, cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    helped = _train_sh("--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--device-modules aft_timm" in helped.stdout


@needs_scripts
def test_recipe_flags_are_accepted_by_timm_train_py(tmp_path):
    spec = importlib.util.spec_from_file_location("timm_train_script", SCRIPTS / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # defines the parser; main() is not run
    cmd = _dry_run("--gpus", "8", "--nnodes", "2", "--timm-dir", str(SCRIPTS), "--num-classes", "10",
                   "--pretrained", cwd=tmp_path)
    launch = torchrun.get_args_parser().parse_args(cmd[1:])
    args = train.parser.parse_args(launch.training_script_args)  # any unknown flag exits here
    assert args.device_modules == ["aft_timm"] and args.opt == "adamw" and args.lr_base_scale == "linear"
    assert (args.lr_base, args.lr_base_size, args.weight_decay) == (5e-4, 512, 0.05)
    assert (args.mixup, args.cutmix, args.reprob, args.smoothing, args.drop_path) == (0.8, 1.0, 0.25, 0.1, 0.1)
    assert args.aug_repeats == 3 and args.model_ema and args.amp and args.warmup_epochs == 5
    assert args.num_classes == 10 and args.pretrained and args.aa == "rand-m9-mstd0.5-inc1"


# ------------------------------------------------------------------------------------------------ aft_timm.run_timm
def test_run_timm_runs_a_script_as_main_with_aft_models_registered(tmp_path):
    (tmp_path / "helper_mod.py").write_text("VALUE = 'sibling import works'\n")
    script = tmp_path / "show.py"
    script.write_text(
        "import json, sys, timm\n"
        "import helper_mod\n"
        "model = timm.create_model(sys.argv[1], img_size=32, num_classes=3)\n"
        "out = model(__import__('torch').zeros(1, 3, 32, 32))\n"
        "if __name__ == '__main__':\n"
        "    print(json.dumps(dict(argv=sys.argv, helper=helper_mod.VALUE, shape=list(out.shape))))\n"
    )
    done = subprocess.run([sys.executable, "-m", "aft_timm.run_timm", str(script), MODEL, "--flag", "x y"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    assert shown == {"argv": [str(script), MODEL, "--flag", "x y"], "helper": "sibling import works", "shape": [1, 3]}

    plain = subprocess.run([sys.executable, str(script), MODEL], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode != 0 and f"Unknown model ({MODEL})" in plain.stderr  # what run_timm is there for


def test_run_timm_errors(capsys):
    with pytest.raises(SystemExit) as missing:
        run_timm.main(["nowhere/validate.py", "--model", MODEL])
    assert missing.value.code == 2
    stderr = capsys.readouterr().err
    assert "script 'nowhere/validate.py' does not exist" in stderr and "git clone" in stderr
    with pytest.raises(SystemExit) as bare:
        run_timm.main([])
    assert bare.value.code == 2 and "usage: python -m aft_timm.run_timm SCRIPT" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ timm's scripts, for real
def _image_folder(root: Path) -> Path:
    """Two classes of random 40x40 images: 4 + 4 for training, 3 dogs + 1 cat for validation."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"cat": 4, "dog": 4}), ("val", {"cat": 1, "dog": 3})):
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{name}{i}.png")
    return root


def _reference_eval(checkpoint: Path, data: Path) -> tuple[float, float, list[int]]:
    """Loss, top-1 and predictions of the checkpoint on data/val, computed here without timm's scripts."""
    model = timm.create_model(MODEL, num_classes=2).eval()
    timm.models.load_checkpoint(model, str(checkpoint), use_ema=False)
    config = timm.data.resolve_data_config({"img_size": 32}, model=model)
    transform = timm.data.create_transform(**config)
    dataset = timm.data.create_dataset("", root=str(data / "val"), transform=transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    predictions = logits.argmax(-1)
    return loss, 100.0 * (predictions == targets).float().mean().item(), predictions.tolist()


def _run_timm(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "aft_timm.run_timm", str(SCRIPTS / script), *args], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _result_json(stdout: str):
    return json.loads(stdout[stdout.rindex("--result") + len("--result"):])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One epoch of the full DeiT recipe on CPU through train_imagenet.sh and timm's train.py: (data, checkpoint)."""
    if SCRIPTS is None:
        pytest.skip("timm's scripts are not available")
    root = tmp_path_factory.mktemp("train")
    data = _image_folder(root / "data")
    done = _train_sh(
        "--device", "cpu", "--model", MODEL, "--data-dir", str(data), "--epochs", "1", "--batch-size", "4",
        "--num-classes", "2", "--output", str(root / "runs"), "--timm-dir", str(SCRIPTS),
        "--", "--img-size", "32", "--workers", "0", "--experiment", "smoke", "--log-interval", "1",
        cwd=root, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return data, root / "runs" / "smoke" / "model_best.pth.tar"


@needs_scripts
def test_train_py_trains_an_aft_model_and_writes_checkpoints(trained):
    data, checkpoint = trained
    run_dir = checkpoint.parent
    assert {"model_best.pth.tar", "last.pth.tar", "args.yaml", "summary.csv"} <= {p.name for p in run_dir.iterdir()}
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)  # our own file, written by train.py
    assert saved["arch"] == MODEL and "state_dict_ema" in saved  # the recipe's EMA is on
    assert saved["state_dict"]["head.weight"].shape == (2, 192)
    assert saved["args"].lr == pytest.approx(5e-4 * 4 / 512)  # linear lr scaling with the global batch
    assert saved["args"].device_modules == ["aft_timm"] and saved["args"].mixup == 0.8


@needs_scripts
def test_validate_py_reports_the_checkpoint_accuracy(trained, tmp_path):
    data, checkpoint = trained
    validated = _run_timm("validate.py", "--model", MODEL, "--data-dir", str(data), "--checkpoint", str(checkpoint),
                          "--num-classes", "2", "--device", "cpu", "--img-size", "32", "--batch-size", "4",
                          "--workers", "0", cwd=tmp_path)
    result = _result_json(validated.stdout)
    loss, top1, _ = _reference_eval(checkpoint, data)
    assert result["model"] == MODEL and result["top1"] == pytest.approx(top1, abs=1e-3)
    logged = re.findall(r"Loss:\s+([\d.]+) \(\s*([\d.]+)\)", validated.stdout + validated.stderr)
    assert logged and float(logged[-1][1]) == pytest.approx(loss, abs=2e-4)
    assert re.search(r"\* Acc@1 [\d.]+", validated.stdout + validated.stderr)


@needs_scripts
def test_benchmark_py_runs_an_aft_model(tmp_path):
    bench = _run_timm("benchmark.py", "--model", MODEL, "--device", "cpu", "--bench", "inference", "--img-size", "32",
                      "--batch-size", "2", "--num-warm-iter", "1", "--num-bench-iter", "5", "--num-classes", "2",
                      cwd=tmp_path)
    result = _result_json(bench.stdout)
    result = result[0] if isinstance(result, list) else result
    n_params = sum(p.numel() for p in timm.create_model(MODEL, num_classes=2).parameters())
    assert result["model"] == MODEL and result["infer_samples_per_sec"] > 0
    assert result["param_count"] == pytest.approx(n_params / 1e6, abs=0.01)


@needs_scripts
def test_inference_py_predicts_with_the_checkpoint(trained, tmp_path):
    pytest.importorskip("pandas", reason="timm's inference.py needs pandas")
    data, checkpoint = trained
    inferred = _run_timm("inference.py", "--model", MODEL, "--data-dir", str(data / "val"), "--checkpoint",
                         str(checkpoint), "--num-classes", "2", "--device", "cpu", "--img-size", "32",
                         "--batch-size", "4", "--workers", "0", "--topk", "1", "--include-index",
                         "--results-dir", str(tmp_path / "pred"), cwd=tmp_path)
    rows = _result_json(inferred.stdout)
    _, _, predictions = _reference_eval(checkpoint, data)
    names = [Path(name).name for name in timm.data.create_dataset("", root=str(data / "val")).filenames()]
    assert [rows[name]["index"] for name in names] == predictions
