"""aft_timm.autoregressive training, evaluation and sampling, in-process and through the command line."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aft_timm.autoregressive import create_model
from aft_timm.autoregressive.__main__ import main
from aft_timm.autoregressive.checkpoint import CheckpointError, load_model, save_checkpoint
from aft_timm.autoregressive.train import TrainConfig, lr_factor, param_groups, train
from ar_helpers import cli_env, make_text_file, run_cli

MODEL = "enwik8_aft_local32_l24_d256"
TINY_KWARGS = ["depth=2", "dim=32", "bias_dim=8", "window=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_text_file(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _log(run_dir) if "lr" in r}


def _train_args(corpus: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", MODEL, "--model-kwargs", *TINY_KWARGS, "--dataset", f"bytes:{corpus}",
            "--seq-len", "64", "--batch-size", "8", "--output", str(output), *extra]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / (run_dir / "latest").read_text().strip() / "model.safetensors")


def test_train_eval_sample_command_line(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    result = run_cli(*_train_args(corpus, run, "--max-steps", "60", "--lr", "3e-3", "--log-interval", "5",
                                  "--eval-interval", "30", "--eval-batches", "4"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 60
    losses = _train_losses(run)
    assert sorted(losses) == list(range(5, 61, 5))
    assert losses[5] > 4.0 and losses[60] < 0.6 * losses[5]  # from ~ln(256) = 5.5 towards the corpus entropy
    evals = [r for r in _log(run) if "split" in r]
    assert [r["step"] for r in evals] == [30, 60] and evals[1]["loss"] < evals[0]["loss"]
    assert "tok_s=" in result.stderr and "loss=" in result.stderr  # the progress bar
    assert (run / "latest").read_text().strip() == "step-00000060"

    assert main(["eval", "--checkpoint", str(run), "--dataset", f"bytes:{corpus}", "--split", "test",
                 "--batch-size", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    size = corpus.stat().st_size
    assert metrics["tokens"] == size - size * 95 // 100  # every byte of the test split is scored once
    assert metrics["bits_per_char"] == pytest.approx(metrics["loss"] / math.log(2))
    assert 1.0 < metrics["bits_per_char"] < 5.0
    # The same number from the library, on the full split, with an independent loss computation.
    model = load_model(run)
    data = torch.tensor(list(corpus.read_bytes()[size * 95 // 100 :]))
    nll = 0.0
    with torch.no_grad():
        for chunk in data.split(64):
            logits = model(chunk[None])[0]
            nll -= torch.log_softmax(logits, -1).gather(1, chunk[:, None]).sum().item()
    assert metrics["loss"] == pytest.approx(nll / data.numel(), rel=1e-5)

    out = tmp_path / "samples.txt"
    assert main(["sample", "--checkpoint", str(run), "--num", "3", "--output", str(out), "--prompt", "the ",
                 "--max-new-tokens", "40", "--seed", "1"]) == 0
    samples = out.read_text(encoding="utf-8").rstrip("\n").split("\n\n" + "=" * 80 + "\n\n")
    assert len(samples) == 3 and all(s.startswith("the ") for s in samples)
    assert all(len(s.encode("utf-8")) >= 40 for s in samples)


def test_killed_run_resumes_to_the_same_loss_curve(corpus, tmp_path):
    common = ["--max-steps", "150", "--log-interval", "1", "--checkpoint-interval", "5", "--eval-interval", "1000",
              "--eval-batches", "2"]
    reference = tmp_path / "reference"  # the same run uninterrupted, in this process
    train(TrainConfig(model=MODEL, dataset=f"bytes:{corpus}", batch_size=8, max_steps=150, output=str(reference),
                      model_kwargs={"depth": 2, "dim": 32, "bias_dim": 8, "window": 8, "seq_len": 64}, log_interval=1,
                      checkpoint_interval=5, eval_interval=1000, eval_batches=2))

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "aft_timm.autoregressive", *_train_args(corpus, run, *common)],
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "log.jsonl").exists() and len((run / "log.jsonl").read_text().splitlines()) >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(_train_losses(run))
    saved = int((run / "latest").read_text().strip().split("-")[1])
    assert 10 <= saved < 150

    result = run_cli(*_train_args(corpus, run, *common, "--resume"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"resuming at step {saved}" in result.stdout
    expected, got = _train_losses(reference), _train_losses(run)
    assert sorted(got) == list(range(1, 151)) and killed_at >= saved
    assert max(abs(expected[s] - got[s]) for s in expected) <= 1e-6
    for name, tensor in _weights(reference).items():
        torch.testing.assert_close(_weights(run)[name], tensor, rtol=0, atol=1e-6)


def test_two_process_torchrun_matches_one_process(corpus, tmp_path):
    common = ["--max-steps", "12", "--log-interval", "1", "--eval-interval", "1000", "--eval-batches", "1",
              "--checkpoint-interval", "1000", "--model-kwargs", *TINY_KWARGS, "dropout=0.0"]
    single = tmp_path / "single"
    result = run_cli(*_train_args(corpus, single, *common), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    double = tmp_path / "double"
    result = run_cli("--standalone", "--nproc_per_node", "2", "-m", "aft_timm.autoregressive",
                     *_train_args(corpus, double, *common), cwd=tmp_path, module="torch.distributed.run")  # torchrun
    assert result.returncode == 0, result.stderr
    assert "2 process(es)" in result.stdout
    a, b = _train_losses(single), _train_losses(double)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    wa, wb = _weights(single), _weights(double)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=2e-5)
    assert a[1] != a[12]


def _config(corpus: Path, output: Path, **kw) -> TrainConfig:
    base = dict(model=MODEL, dataset=f"bytes:{corpus}", batch_size=8, max_steps=6, output=str(output),
                model_kwargs={"depth": 1, "dim": 32, "bias_dim": 8, "window": 8, "seq_len": 32, "dropout": 0.0},
                eval_interval=1000, eval_batches=1, log_interval=1, checkpoint_interval=1000)
    return TrainConfig(**{**base, **kw})


def test_gradient_accumulation_gives_the_same_run(corpus, tmp_path):
    train(_config(corpus, tmp_path / "a"))
    train(_config(corpus, tmp_path / "b", grad_accum_steps=4))
    a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    for name, tensor in _weights(tmp_path / "a").items():
        torch.testing.assert_close(_weights(tmp_path / "b")[name], tensor, rtol=1e-4, atol=1e-5)


def test_schedule_and_weight_decay_groups(corpus, tmp_path):
    cfg = _config(corpus, tmp_path / "run", max_steps=10, warmup_steps=3, lr=1e-3)
    train(cfg)
    lrs = [r["lr"] for r in _log(tmp_path / "run") if "lr" in r]
    expected = [1e-3 * (s + 1) / 3 for s in range(3)]
    expected += [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(3, 10)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lr_factor(9, 3, 10) > 0 and lr_factor(10, 3, 10) == pytest.approx(0.0)
    assert TrainConfig(model=MODEL, dataset="cifar10", batch_size=1, max_steps=100, output="x").weight_decay == 0.1
    assert TrainConfig(model=MODEL, dataset="enwik8", batch_size=1, max_steps=100, output="x").weight_decay == 0.5
    assert TrainConfig(model=MODEL, dataset="enwik8", batch_size=1, max_steps=100, output="x").warmup_steps == 5

    model = create_model(MODEL, depth=1, dim=32, bias_dim=8)
    decay, no_decay = param_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    linear_weights = ("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight", "head.weight")
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decayed == sorted(n for n in names.values() if n.endswith(linear_weights))
    assert {"pos_emb", "tok_emb.weight", "blocks.0.mixer.pos_u", "norm.weight"} <= {names[id(p)] for p in
                                                                                   no_decay["params"]}


def test_resume_guards(corpus, tmp_path):
    run = tmp_path / "run"
    train(_config(corpus, run, max_steps=2))
    with pytest.raises(FileExistsError, match="already holds a run.*--resume"):
        train(_config(corpus, run, max_steps=2))
    with pytest.raises(ValueError, match=r"--resume needs the settings.*\n  lr: 0.001 \(checkpoint: 0.003\)"):
        train(_config(corpus, run, max_steps=2, lr=1e-3, resume=True))
    summary = train(_config(corpus, run, max_steps=2, resume=True))  # nothing left to do
    assert summary["step"] == 2
    fresh = train(_config(corpus, tmp_path / "fresh", max_steps=1, resume=True))  # nothing to resume: a new run
    assert fresh["step"] == 1
    with pytest.raises(ValueError, match="the model reads image but"):
        train(_config(corpus, tmp_path / "x", model="cifar10_aft_simple_l24_d256",
                      model_kwargs={"depth": 1, "dim": 16}))
    with pytest.raises(ValueError, match="batch_size=8 must be divisible by processes x grad_accum_steps = 1 x 3"):
        train(_config(corpus, tmp_path / "y", grad_accum_steps=3))


def test_checkpoint_errors(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(_config(corpus, run, max_steps=1))
    ckpt = run / "step-00000001"
    assert sorted(p.name for p in run.iterdir()) == ["latest", "log.jsonl", "step-00000001"]  # no temporary files
    assert load_model(ckpt).config.depth == 1

    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither a run directory"):
        load_model(tmp_path)
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="corrupt weights file .*model.safetensors"):
        load_model(run)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_model(run)
    (ckpt / "model.safetensors").write_bytes(weights)
    (ckpt / "training_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt training state"):
        train(_config(corpus, run, max_steps=1, resume=True))
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt .*config.json"):
        load_model(run)
    (ckpt / "config.json").write_text(json.dumps({"mixer": "aft_local", "depth": 1, "colour": "red"}))
    with pytest.raises(CheckpointError, match="invalid model config.*colour"):
        load_model(run)
    (run / "latest").write_text("step-00000099\n")
    with pytest.raises(CheckpointError, match="names step-00000099, which does not exist"):
        load_model(run)
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere"), "--dataset", f"bytes:{corpus}"]) == 1
    assert "error: checkpoint not found" in capsys.readouterr().err


def test_sample_image_grid_png(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("cifar10_aft_simple_l24_d256", depth=1, dim=16)
    save_checkpoint(tmp_path / "run", model, {"step": 0}, {})
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--num", "3", "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (2 + 2 * 34, 2 + 2 * 34)  # 2 x 2 grid of 32 x 32 images, 2-pixel padding
        pixels = np.asarray(image)
    first = pixels[2:34, 2:34]  # the first sample, top left
    assert len(np.unique(first.reshape(-1, 3), axis=0)) > 100  # sampled, not blank
    assert (pixels[36:68, 36:68] == 255).all()  # the unused fourth cell is padding
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--num", "1", "--output", str(out),
                 "--prompt", "x"]) == 1
    assert "a prompt is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("mixer", ["aft_local", "aft_simple", "aft_full", "aft_conv1d", "transformer"])
def test_bf16_autocast_training_tracks_float32(corpus, tmp_path, mixer):
    kwargs = {"depth": 1, "dim": 32, "bias_dim": 8, "window": 8, "seq_len": 32, "dropout": 0.0, "mixer": mixer,
              "num_heads": 4, "kernel_size": 4}
    runs = {p: train(_config(corpus, tmp_path / p, max_steps=4, precision=p, model_kwargs=kwargs, eval_batches=2))
            for p in ("fp32", "bf16")}
    assert math.isfinite(runs["bf16"]["loss"]) and runs["bf16"]["loss"] < math.log(256)
    assert runs["bf16"]["eval_loss"] == pytest.approx(runs["fp32"]["eval_loss"], abs=0.05)
