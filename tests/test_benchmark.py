"""Tests of `python -m aft_timm.benchmark`: a real run at tiny sizes, its JSON and plot, the memory meter, the
materialized-attention baseline, the target verdicts and the command-line errors."""
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aft_timm import autoregressive, benchmark
from aft_timm.autoregressive.attention import CausalSelfAttention

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real `--quick` run of every task through the command line, with its JSON and plot."""
    out = tmp_path_factory.mktemp("bench")
    json_path, plot_path = out / "bench.json", out / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "aft_timm.benchmark", "--quick", "--json", str(json_path), "--plot", str(plot_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),  # a smoke test: one thread is robust to a busy CI machine
    )
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(json_path.read_text()), plot_path


def test_quick_run_records(quick_run):
    _, records, _ = quick_run
    expected = benchmark.plan_cases(benchmark.TASKS, mode="quick")
    assert [(r["task"], r["model"], r["size"]) for r in records] == [(c.task, c.model, c.size) for c in expected]
    for r in records:
        assert r["status"] == "ok", r["error"]
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["unit"] == ("images/s" if r["task"].startswith("vision") else "tokens/s")
        # items_per_s is the work of one call over the median of the timed calls
        assert len(r["seconds"]) == r["repeats"] == 2
        assert r["median_s"] == statistics.median(r["seconds"])
        assert r["items_per_s"] == pytest.approx(r["items_per_step"] / r["median_s"])
        # The weights are resident during the case; training also holds gradients and two AdamW moments.
        weights = 4 * r["params"]
        assert r["peak_mem_bytes"] >= (4 * weights if r["task"].endswith("train") else weights)
        assert r["peak_mem_bytes"] < 4 * weights + 400 * MiB
    for task in benchmark.TASKS:
        rows = [r for r in records if r["task"] == task]
        assert {r["baseline"] for r in rows} == {True, False}, task
    vision = [r for r in records if r["task"] == "vision-infer"]
    assert {r["items_per_step"] for r in vision} == {2}  # batch 2 images per call
    ar_train = [r for r in records if r["task"] == "ar-train"]
    assert {r["model"] for r in ar_train} == set(benchmark.AR_MODELS)
    assert all(r["items_per_step"] == 2 * r["size"] for r in ar_train)
    for r in (r for r in records if r["task"] == "ar-generate"):
        assert r["items_per_step"] == r["size"] == 32
        assert r["edge_tokens"] == 16 and r["ms_per_token_first"] > 0 and r["ms_per_token_last"] > 0
        # the per-token clock accounts for (nearly) all of a sampling call
        assert r["edge_tokens"] * (r["ms_per_token_first"] + r["ms_per_token_last"]) / 1e3 < 1.5 * r["median_s"]


def test_quick_run_table_and_plot(quick_run):
    proc, records, plot_path = quick_run
    for task in benchmark.TASKS:
        assert f"**{task}**" in proc.stdout
    for r in records:
        assert r["model"] in proc.stdout
    assert f"[ 1/{len(records)}]" in proc.stderr and "done in" in proc.stderr  # progress
    data = plot_path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 30_000
    from matplotlib.image import imread

    image = imread(plot_path)
    height, width = image.shape[:2]
    assert width > 1000 and height > 4 * 300  # two panels per row, one row per task
    assert image[..., :3].std() > 0.05  # something was drawn


def test_peak_memory_sees_the_case_only():
    # A fresh interpreter leaves a high-water mark the meter must forget (a freed 256 MiB tensor) and 96 MiB of freed
    # but resident holes in the C heap, then the "case" allocates and frees 96 MiB in pieces that fit those holes.
    code = textwrap.dedent("""
        import torch
        from aft_timm.benchmark import PeakMemory
        before = torch.ones(64 * 2**20); del before
        pieces = [torch.ones(24 * 1024) for _ in range(2048)]; del pieces[::2]
        meter = PeakMemory(torch.device("cpu"))
        idle = meter.peak_bytes()
        held = [torch.ones(24 * 1024) for _ in range(1024)]
        del held
        print(idle, meter.peak_bytes(), meter.method)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    idle, peak, method = out.stdout.split()
    if sys.platform.startswith("linux"):
        assert method == "linux"
        assert int(idle) < 8 * MiB
        assert 90 * MiB <= int(peak) < 110 * MiB  # within a few MiB: kernel RSS counters are approximate
    else:
        assert 90 * MiB <= int(peak) < 400 * MiB


def test_peak_memory_repeats_and_sees_activations():
    # Two fresh workers measuring the same case agree: the meter sees live memory, not the allocator's leftovers.
    # And the materialized Transformer holds at least its softmax outputs (saved for backward) more than the fused
    # one: layers x heads x T x T floats.
    context = benchmark._context()
    cases = [benchmark.Case("ar-train", model, 1024, 1, "cpu", "float32", 0, 1, ar_depth=2)
             for model in ("transformer-materialized", "transformer-materialized", "transformer")]
    results = [benchmark._run_worker(case, "memory", context) for case in cases]
    assert [status for status, _ in results] == ["ok"] * 3
    explicit, again, fused = (fields["peak_mem_bytes"] for _, fields in results)
    assert explicit == pytest.approx(again, rel=0.03)
    assert explicit - fused > 0.9 * 2 * 2 * 1024 * 1024 * 4


def test_repeats_fill_the_minimum_time():
    case = benchmark.Case("ar-train", "aft-simple", 32, 1, "cpu", "float32", warmup=0, repeats=2, ar_depth=1,
                          min_seconds=0.3)
    seconds = benchmark.measure_speed(case)["seconds"]
    # at least `repeats` calls; then calls until they add up to min_seconds (or the cap), and not one more
    assert len(seconds) >= 2
    assert sum(seconds) >= 0.3 or len(seconds) == benchmark._MAX_REPEATS
    assert len(seconds) == 2 or sum(seconds[:-1]) < 0.3
    assert len(seconds) > 2 or sum(seconds) >= 0.3


def _decoder(depth: int = 2) -> torch.nn.Module:
    return autoregressive.create_model("cifar10_transformer_l24_d256", depth=depth, dim=32, num_heads=2,
                                       dropout=0.0, modality="text", seq_len=64)


def test_materialized_attention_matches_fused():
    torch.manual_seed(0)
    fused = CausalSelfAttention(32, 4)
    explicit = benchmark.MaterializedCausalSelfAttention(32, 4)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(3, 17, 32, requires_grad=True)
    torch.testing.assert_close(explicit(x), fused(x))
    # an independent loop: position t attends to positions <= t only
    q, k, v = fused.split_heads(x)
    rows = [torch.softmax(q[..., t:t + 1, :] @ k[..., :t + 1, :].transpose(-2, -1) / 8**0.5, -1) @ v[..., :t + 1, :]
            for t in range(17)]
    torch.testing.assert_close(explicit(x), fused.merge_heads(torch.cat(rows, dim=-2)))


def test_materialize_attention_swaps_every_layer_and_keeps_the_function():
    torch.manual_seed(0)
    model = _decoder(depth=3).eval()
    tokens = torch.randint(0, 256, (2, 40))
    reference = model(tokens)
    assert benchmark._materialize_attention(model) == 3
    assert all(type(b.mixer) is benchmark.MaterializedCausalSelfAttention for b in model.blocks)
    torch.testing.assert_close(model(tokens), reference)
    assert not model.training
    assert benchmark._materialize_attention(autoregressive.create_model("enwik8_aft_simple_l24_d256", depth=1)) == 0


def test_failed_case_is_recorded_not_raised():
    case = benchmark.Case("vision-infer", "deit_tiny_patch16_224", 8, 1, "cpu", "float32", 0, 1)
    record = benchmark.run_case(case)
    assert record["status"] == "error" and record["items_per_s"] is None and record["peak_mem_bytes"] is None
    assert "Kernel size can't be greater than actual input size" in record["error"]


def _record(task, model, size, items_per_s, mem, **extra):
    return dict(task=task, model=model, size=size, items_per_s=items_per_s, peak_mem_bytes=mem, status="ok",
                unit=benchmark.UNITS[task], **extra)


def test_default_plan_measures_every_target():
    cases = benchmark.plan_cases(benchmark.TASKS)
    records = [_record(c.task, c.model, c.size, 1.0, 1, ms_per_token_first=1.0, ms_per_token_last=1.0,
                       edge_tokens=100) for c in cases]
    verdicts = benchmark.evaluate_targets(records)
    assert len(verdicts) == 8 and all(v.met is not None for v in verdicts), [str(v) for v in verdicts]
    # quadratic baselines stay within 3072 tokens in the default run
    assert max(c.size for c in cases if c.task == "ar-train" and c.baseline) == 3072
    assert max(c.size for c in cases if c.task == "ar-train" and not c.baseline) == 16384


def test_target_verdicts():
    conv, deit = "aft_conv_tiny_h32_k11_patch16_224", "deit_tiny_patch16_224"
    records = [
        _record("vision-infer", deit, 896, 1.0, 100), _record("vision-infer", conv, 896, 3.2, 90),
        _record("vision-infer", deit, 224, 10.0, 100), _record("vision-infer", conv, 224, 8.5, 90),
        _record("ar-train", "aft-local-256", 3072, 1500, 30), _record("ar-train", "transformer", 3072, 1000, 40),
        _record("ar-train", "transformer-materialized", 3072, 800, 100),
        _record("ar-train", "aft-simple", 1024, 1000, 10), _record("ar-train", "aft-simple", 16384, 700, 90),
        _record("ar-generate", "aft-local-256", 3072, 300, 5, ms_per_token_first=3.0, ms_per_token_last=3.3,
                edge_tokens=100),
        _record("ar-generate", "transformer", 3072, 100, 9),
    ]
    verdicts = benchmark.evaluate_targets(records)
    by_start = lambda prefix: [v for v in verdicts if v.name.startswith(prefix)]  # noqa: E731
    (v896,) = by_start("vision 896 px")
    assert v896.met is True and "3.20x images/s" in v896.detail and "0.90x memory" in v896.detail
    (v224,) = by_start("vision 224 px")
    assert v224.met is False and "0.85x" in v224.detail
    (ar,) = by_start("ar-train T=3072")
    assert ar.met is True and "1.50x tokens/s" in ar.detail and "0.30x transformer-materialized" in ar.detail
    linear = {v.name: v for v in by_start("linear cost")}
    assert linear["linear cost: aft-simple tokens/s at T=16384 within 1.5x of T=1024"].met is True  # 1.43x
    assert linear["linear cost: aft-local-256 tokens/s at T=16384 within 1.5x of T=1024"].met is None
    (gen,) = by_start("ar-generate")
    assert gen.met is True and "3.00x tokens/s" in gen.detail and "1.10x" in gen.detail
    records[-2]["ms_per_token_last"] = 3.7  # cost per token grows: not met
    assert [v.met for v in benchmark.evaluate_targets(records) if v.name.startswith("ar-generate")] == [False]


def test_table_cells():
    records = [_record("ar-train", "transformer", 1024, 1234.5, 3 * MiB), _record("ar-train", "aft-simple", 2048, 99.0,
                                                                                   MiB)]
    for r in records:
        r.update(device="cpu", dtype="float32", batch_size=1, ar_depth=4)
    records.append(dict(records[0], size=2048, status="oom", items_per_s=None, peak_mem_bytes=None))
    table = benchmark.format_tables(records).splitlines()
    assert table[0] == "**ar-train**: tokens/s (peak memory), cpu, float32, batch 1, 4 layers"
    assert table[2] == "| model | 1024 tokens | 2048 tokens |"
    assert table[4] == "| transformer (baseline) | 1.23e+03 (3 MiB) | OOM |"
    assert table[5] == "| aft-simple | - | 99 (1 MiB) |"


@pytest.mark.parametrize("argv, message", [
    (["--image-sizes", "224", "100"], "--image-sizes: 100 is not a multiple of the patch size 16"),
    (["--models", "nope"], "--models: unknown model(s) nope"),
    (["--models", "aft-simple", "--tasks", "vision-infer"], "none of aft-simple runs in the selected tasks"),
    (["--json", "/nonexistent-dir/b.json"], "--json: directory /nonexistent-dir does not exist"),
    (["--repeats", "0"], "expected a positive integer, got 0"),
    (["--tasks", "vision"], "invalid choice: 'vision'"),
    (["--quick", "--full"], "not allowed with argument"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_requested_without_cuda(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--device", "cuda"])
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [plot] extra were not installed
    with pytest.raises(SystemExit):
        benchmark.main(["--plot", str(tmp_path / "b.png")])
    assert "--plot needs matplotlib: pip install 'aft-timm[plot]'" in capsys.readouterr().err
