"""Benchmark AFT against attention: throughput and peak memory, side by side, on your own machine.

Usage::

    python -m aft_timm.benchmark                            # default run: a few minutes on a laptop CPU
    python -m aft_timm.benchmark --json bench.json --plot bench.png
    python -m aft_timm.benchmark --device cuda --dtype bfloat16 --full      # the paper's sizes

Tasks (``--tasks``):

* ``vision-infer``: images/s of a forward pass (eval mode, ``torch.inference_mode``) of the AFT vision models and
  timm's DeiT (fused scaled-dot-product attention) at several image sizes. Every model is created for the size
  (``img_size=``), so DeiT gets a position embedding of the right length.
* ``vision-train``: images/s of a training step: forward, cross-entropy, backward, AdamW step (fused kernel).
* ``ar-train``: tokens/s of a training step of the autoregressive decoders at several sequence lengths: AFT-local,
  AFT-simple, the Transformer of the same depth and width with fused causal attention
  (``F.scaled_dot_product_attention``), and the same Transformer with the T x T attention matrix materialized
  (softmax of explicit scores), the baseline the paper measured. Dropout is off in every decoder: CPU's fused
  attention kernel has none (with dropout the "fused" Transformer would quietly materialize its attention).
* ``ar-generate``: tokens/s sampling a sequence one token at a time: AFT-local and AFT-simple with their constant-size
  recurrent state against the Transformer with a KV cache. Per-token times over the first and the last 100 tokens
  are recorded too (``ms_per_token_first``, ``ms_per_token_last``).

Method: every case (task, model, size) is measured by two fresh worker processes in turn, forked from a server
process that has imported torch, timm and aft_timm but computed nothing, so that no case inherits another's state.

* Speed: the worker builds the model and inputs, runs ``--warmup`` untimed calls, then ``--repeats`` timed calls
  (synchronizing CUDA around each), more while they add up to less than a second (two with ``--full``), at most 100;
  ``items_per_s`` is the work of one call over the median time. The process's
  memory allocator is left as it is: its cost (page faults on memory it hands back and takes again) is part of what a
  user's process pays.
* Memory: the worker builds the model and makes one call, or two for training (the second runs with the optimizer
  state that the first created). ``peak_mem_bytes`` is the most memory the case held at any moment above what the
  worker held before the model was built: weights, inputs, activations, gradients, optimizer state, caches and
  workspace.

  - CUDA: ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``, minus the memory
    allocated at the start (live tensors, not the caching allocator's reserve).
  - CPU on Linux: the live memory as the kernel sees it. The worker first makes glibc give every block of 128 KiB or
    more its own mapping, returned to the kernel when freed (``mallopt(M_MMAP_THRESHOLD)``; by default freed blocks
    stay resident and are reused unseen), hands free heap pages back (``malloc_trim``), and resets the kernel's
    resident-set high-water mark (writes ``5`` to ``/proc/self/clear_refs``); it reads the mark (``VmHWM``) at the
    end. Pages of shared libraries that the first kernel calls bring in (``RssFile``, ``RssShmem``) are not the
    case's memory, so peak = VmHWM - RssFile - RssShmem (at the end) - RssAnon (at the start).
  - CPU elsewhere: the growth of ``ru_maxrss`` (an approximation that includes the allocator's reserve).

The default run measures what the package promises (`evaluate_targets`) and prints a summary of those targets, met
or not, with the numbers. ``--json FILE`` writes one record per case; ``--plot FILE`` draws throughput and
peak memory against size, log-scaled, one row of panels per task (needs matplotlib: ``pip install aft-timm[plot]``).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

import aft_timm
from aft_timm import autoregressive
from aft_timm._io import write_atomic
from aft_timm.autoregressive.attention import CausalSelfAttention

__all__ = ["Case", "TASKS", "main", "run_cases", "plan_cases", "evaluate_targets", "format_tables", "write_plot"]

TASKS = ("vision-infer", "vision-train", "ar-train", "ar-generate")
UNITS = {"vision-infer": "images/s", "vision-train": "images/s", "ar-train": "tokens/s", "ar-generate": "tokens/s"}
SIZE_UNITS = {"vision-infer": "px", "vision-train": "px", "ar-train": "tokens", "ar-generate": "tokens"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PATCH_SIZE = 16

# Autoregressive models by benchmark label: (registry name in aft_timm.autoregressive, attention implementation).
AR_MODELS = {
    "aft-local-256": ("cifar10_aft_local256_l24_d256", None),
    "aft-simple": ("cifar10_aft_simple_l24_d256", None),
    "transformer": ("cifar10_transformer_l24_d256", "sdpa"),
    "transformer-materialized": ("cifar10_transformer_l24_d256", "materialized"),
}
VISION_TINY = (
    "deit_tiny_patch16_224",
    "aft_full_tiny_patch16_224",
    "aft_simple_tiny_patch16_224",
    "aft_conv_tiny_h32_k11_patch16_224",
    "aft_conv_tiny_h192_k11_patch16_224",
)
VISION_SMALL = (
    "deit_small_patch16_224",
    "aft_full_small_patch16_224",
    "aft_simple_small_patch16_224",
    "aft_conv_small_h16_k11_patch16_224",
    "aft_conv_small_h384_k11_patch16_224",
)


@dataclass(frozen=True)
class TaskPlan:
    """What one task measures in a run mode.

    Attributes:
        sizes: Image sizes (px) or sequence lengths (tokens).
        batch_size: Images or sequences per call.
        models: Model names (timm names for vision, ``AR_MODELS`` labels for the decoders).
        baseline_max_size: Attention baselines are left out above this size (their cost is quadratic); ``None``
            runs them everywhere. Ignored when the sizes are given on the command line.
    """

    sizes: tuple[int, ...]
    batch_size: int
    models: tuple[str, ...]
    baseline_max_size: int | None = None


@dataclass(frozen=True)
class Mode:
    """A run mode: per-task plans, decoder depth, warm-up calls, timed repeats (at least; more while their total time
    is under `min_seconds`)."""

    plans: dict[str, TaskPlan]
    ar_depth: int
    warmup: int
    repeats: int
    min_seconds: float


VISION_QUICK = ("deit_tiny_patch16_224", "aft_full_tiny_patch16_224", "aft_conv_tiny_h32_k11_patch16_224")
_AR_ALL = tuple(AR_MODELS)
_AR_GENERATE = ("aft-local-256", "aft-simple", "transformer")
MODES = {
    # Sized for a 2-core laptop CPU: about 3 minutes, and measures every target.
    "default": Mode(
        plans={
            "vision-infer": TaskPlan((224, 448, 672, 896), 1, VISION_TINY),
            "vision-train": TaskPlan((224, 448), 1, VISION_TINY),
            "ar-train": TaskPlan((1024, 3072, 16384), 1, _AR_ALL, baseline_max_size=3072),
            "ar-generate": TaskPlan((3072,), 1, _AR_GENERATE),
        },
        ar_depth=4, warmup=1, repeats=3, min_seconds=1.0,
    ),
    # The paper's models and sizes (vision batch 256 as in its Table 7; its 24-layer decoders); meant for a GPU.
    "full": Mode(
        plans={
            "vision-infer": TaskPlan((224, 448, 672, 896), 256, VISION_TINY + VISION_SMALL),
            "vision-train": TaskPlan((224, 448, 672, 896), 64, VISION_TINY + VISION_SMALL),
            "ar-train": TaskPlan((1024, 2048, 3072, 4096, 8192, 16384), 4, _AR_ALL),
            "ar-generate": TaskPlan((3072,), 1, _AR_GENERATE),
        },
        ar_depth=24, warmup=2, repeats=5, min_seconds=2.0,
    ),
    # Tiny sizes and a few models, for smoke tests: seconds.
    "quick": Mode(
        plans={
            "vision-infer": TaskPlan((32, 64), 2, VISION_QUICK),
            "vision-train": TaskPlan((32,), 2, VISION_QUICK),
            "ar-train": TaskPlan((64, 128), 2, _AR_ALL),
            "ar-generate": TaskPlan((32,), 1, _AR_GENERATE),
        },
        ar_depth=1, warmup=1, repeats=2, min_seconds=0.0,
    ),
}


@dataclass(frozen=True)
class Case:
    """One measurement: a model on a task at one size. Runs in its own worker process."""

    task: str
    model: str
    size: int
    batch_size: int
    device: str
    dtype: str
    warmup: int
    repeats: int
    ar_depth: int | None = None
    min_seconds: float = 0.0

    @property
    def baseline(self) -> bool:
        """Whether the model is an attention baseline rather than an AFT model."""
        return "aft" not in self.model


# ----------------------------------------------------------------------------------------------------------------
# peak memory


def _proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def _release_free_heap() -> None:
    """Returns the C heap's free pages to the kernel (glibc), so that allocations reusing them count as new memory."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def _fix_mmap_threshold(size: int = 128 * 1024) -> None:
    """Makes glibc serve every block of `size` bytes or more with its own mapping, returned to the kernel when freed
    (by default the threshold grows with freed blocks, and freed memory then stays resident in the heap)."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, size)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


class PeakMemory:
    """Measures the peak memory this process uses on `device` from now on (see the module docstring).

    On Linux (CPU) it makes the C heap give every block of 128 KiB or more its own mapping, returned to the kernel
    when freed, for the rest of the process: the resident set then follows the live tensors, at some cost in speed.

    Args:
        device: The device whose memory is measured.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self._start = torch.cuda.memory_allocated(device)
            self.method = "cuda"
        elif self._reset_linux_hwm():
            self._start = _proc_status()["RssAnon"]
            self.method = "linux"
        else:
            self._start = self._maxrss()
            self.method = "maxrss"

    @staticmethod
    def _reset_linux_hwm() -> bool:
        """Lowers the resident-set high-water mark to the current resident set; False where that is impossible."""
        _fix_mmap_threshold()
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "RssAnon" in _proc_status()
        except OSError:
            return False

    @staticmethod
    def _maxrss() -> int:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere

    def peak_bytes(self) -> int:
        """Peak memory since construction, in bytes, above the memory held at construction."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._start
        if self.method == "linux":
            status = _proc_status()
            return max(status["VmHWM"] - status["RssFile"] - status.get("RssShmem", 0) - self._start, 0)
        return max(self._maxrss() - self._start, 0)


# ----------------------------------------------------------------------------------------------------------------
# workloads: what one timed call does


@dataclass
class Workload:
    """A built case: `step` is the timed call, processing `items_per_step` images or tokens; `warmup_step` (`step` if
    None) the untimed one; `extra` returns more fields for the record after the timed calls."""

    step: Callable[[], None]
    items_per_step: int
    params: int
    extra: Callable[[], dict[str, Any]] = dict
    warmup_step: Callable[[], None] | None = None


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # The fused kernel: the optimizer step is the same work for every model, so the fastest one keeps it from
    # diluting the differences between token mixers.
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def _vision_workload(case: Case, device: torch.device, dtype: torch.dtype) -> Workload:
    model = timm.create_model(case.model, img_size=case.size, device=device, dtype=dtype)
    images = torch.randn(case.batch_size, 3, case.size, case.size, device=device, dtype=dtype)
    if case.task == "vision-infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                model(images)

        return Workload(step, case.batch_size, _count_params(model))

    model.train()
    labels = torch.randint(0, model.num_classes, (case.batch_size,), device=device)
    optimizer = _optimizer(model)

    def train_step() -> None:
        loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Workload(train_step, case.batch_size, _count_params(model))


class MaterializedCausalSelfAttention(CausalSelfAttention):
    """The paper's Transformer baseline: softmax(q k^T / sqrt(d) + causal mask) v with the T x T scores in memory.

    Same parameters as `CausalSelfAttention`; only the attention kernel differs (explicit scores and softmax, no
    fused scaled-dot-product attention).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        T = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu_(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        weights = F.dropout(weights, self.attn_drop, self.training)
        return self.merge_heads(weights @ v)


def _materialize_attention(model: nn.Module) -> int:
    """Swaps every `CausalSelfAttention` in `model` for a `MaterializedCausalSelfAttention` with the same weights."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is CausalSelfAttention]
    for parent, name, attn in swaps:
        weight = attn.qkv.weight
        twin = MaterializedCausalSelfAttention(attn.qkv.in_features, attn.num_heads, attn.attn_drop,
                                               attn.proj_drop.p, device=weight.device, dtype=weight.dtype)
        twin.load_state_dict(attn.state_dict())
        twin.train(attn.training)
        setattr(parent, name, twin)
    return len(swaps)


def _ar_model(case: Case, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The decoder of `case` with a context of `case.size` tokens (the CIFAR10 configs keep their 3072)."""
    arch, attention = AR_MODELS[case.model]
    # No dropout: CPU's fused attention kernel has none, and with it the Transformer would fall back to the
    # materialized attention it is measured against.
    overrides: dict[str, Any] = {"dropout": 0.0}
    if case.ar_depth is not None:
        overrides["depth"] = case.ar_depth
    if autoregressive.model_config(arch).seq_len != case.size:
        overrides.update(modality="text", seq_len=case.size)  # same architecture, another context length
    with torch.device(device):
        model = autoregressive.create_model(arch, **overrides).to(dtype)
    if attention == "materialized" and _materialize_attention(model) == 0:
        raise RuntimeError(f"{arch} has no CausalSelfAttention layer to materialize")
    return model


def _ar_train_workload(case: Case, device: torch.device, dtype: torch.dtype) -> Workload:
    model = _ar_model(case, device, dtype).train()
    # The decoder shifts its input behind a start token itself: logits[:, t] predicts tokens[:, t].
    tokens = torch.randint(0, model.config.vocab_size, (case.batch_size, case.size), device=device)
    optimizer = _optimizer(model)

    def step() -> None:
        loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Workload(step, case.batch_size * case.size, _count_params(model))


_EDGE_TOKENS = 100  # per-token time is compared over the first and the last this many generated tokens
_WARMUP_TOKENS = 64  # length of an untimed warm-up sample


def _ar_generate_workload(case: Case, device: torch.device, dtype: torch.dtype) -> Workload:
    model = _ar_model(case, device, dtype).eval()
    prompt = torch.empty(case.batch_size, 0, dtype=torch.long, device=device)  # sample from the start token
    sync = _synchronizer(device)
    stamps: list[float] = []

    def stamp(*_: Any) -> None:  # the output head runs once per sampled token: its calls time every step
        sync()
        stamps.append(time.perf_counter())

    model.head.register_forward_hook(stamp)
    edges: list[tuple[float, float]] = []
    edge = min(_EDGE_TOKENS, case.size // 2)

    def step() -> None:
        stamps.clear()
        sync()
        stamps.append(time.perf_counter())
        model.generate(prompt, max_new_tokens=case.size, temperature=1.0)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        if edge:
            edges.append((statistics.fmean(gaps[:edge]), statistics.fmean(gaps[-edge:])))

    def warmup_step() -> None:  # a short sample runs every kernel of a long one
        model.generate(prompt, max_new_tokens=min(case.size, _WARMUP_TOKENS), temperature=1.0)

    def extra() -> dict[str, Any]:
        if not edges:
            return {}
        return {"ms_per_token_first": 1e3 * statistics.median(e[0] for e in edges),
                "ms_per_token_last": 1e3 * statistics.median(e[1] for e in edges),
                "edge_tokens": edge}

    return Workload(step, case.batch_size * case.size, _count_params(model), extra, warmup_step)


_WORKLOADS = {
    "vision-infer": _vision_workload,
    "vision-train": _vision_workload,
    "ar-train": _ar_train_workload,
    "ar-generate": _ar_generate_workload,
}


_MAX_REPEATS = 100


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def measure_speed(case: Case) -> dict[str, Any]:
    """Builds `case` in this process, times it, and returns the speed fields of its record."""
    device = torch.device(case.device)
    sync = _synchronizer(device)
    workload = _WORKLOADS[case.task](case, device, DTYPES[case.dtype])
    for _ in range(case.warmup):
        (workload.warmup_step or workload.step)()
    seconds: list[float] = []
    while len(seconds) < case.repeats or (sum(seconds) < case.min_seconds and len(seconds) < _MAX_REPEATS):
        sync()
        start = time.perf_counter()
        workload.step()
        sync()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "items_per_s": workload.items_per_step / median,
        "median_s": median,
        "seconds": seconds,
        "items_per_step": workload.items_per_step,
        "params": workload.params,
        **workload.extra(),
    }


def measure_memory(case: Case) -> dict[str, Any]:
    """Builds `case` in this process and returns the peak memory of building it and making one call, or two for
    training (the second one runs with the optimizer state that the first created). Changes the process's heap on
    Linux: run it in a process of its own."""
    device = torch.device(case.device)
    memory = PeakMemory(device)
    workload = _WORKLOADS[case.task](case, device, DTYPES[case.dtype])
    for _ in range(2 if case.task.endswith("train") else 1):
        workload.step()
    return {"peak_mem_bytes": memory.peak_bytes(), "memory_method": memory.method}


# ----------------------------------------------------------------------------------------------------------------
# running cases in worker processes


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(error)


def _worker(case: Case, phase: str, conn: Any) -> None:
    """Worker process entry point: measures the speed or the memory of `case`; sends (status, fields or error)."""
    try:
        conn.send(("ok", (measure_speed if phase == "speed" else measure_memory)(case)))
    except Exception as error:  # reported in the case's record, the run goes on
        status = "oom" if _is_out_of_memory(error) else "error"
        conn.send((status, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}"))
    finally:
        conn.close()


def _context() -> multiprocessing.context.BaseContext:
    """Fresh worker processes, cheaply: forked from a server that imported torch, timm and aft_timm (not this module,
    which a worker runs as its main module) and computed nothing; spawned where there is no fork server."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["aft_timm", "aft_timm.autoregressive"])
        return context
    return multiprocessing.get_context("spawn")


def _load_average() -> float | None:
    """The 1-minute system load average, where the platform has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _base_record(case: Case) -> dict[str, Any]:
    record = asdict(case)
    record.update(
        baseline=case.baseline,
        unit=UNITS[case.task],
        size_unit=SIZE_UNITS[case.task],
        items_per_s=None,
        peak_mem_bytes=None,
        status="ok",
        error=None,
        threads=torch.get_num_threads() if case.device == "cpu" else None,
        load_avg=_load_average(),
        torch=torch.__version__,
        aft_timm=aft_timm.__version__,
        machine=platform.processor() or platform.machine(),
    )
    if case.task.startswith("ar"):
        record["arch"], record["attention"] = AR_MODELS[case.model]
    return record


def _run_worker(case: Case, phase: str, context: multiprocessing.context.BaseContext) -> tuple[str, Any]:
    """Runs one measurement `phase` of `case` in a fresh worker process; returns (status, fields or error)."""
    worker = importlib.import_module("aft_timm.benchmark")._worker  # by module name, for the forkserver's pickling
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=worker, args=(case, phase, sender), daemon=True)
    process.start()
    sender.close()
    try:
        return receiver.recv()
    except EOFError:  # the worker died without a word: killed (the kernel's out-of-memory killer sends SIGKILL)
        process.join()
        code = process.exitcode
        if code == -signal.SIGKILL:
            return "oom", "worker killed by SIGKILL (out of memory?)"
        return "error", f"worker killed by signal {-code}" if code < 0 else f"worker exited with code {code}"
    except BaseException:  # interrupted: do not leave the worker running
        process.terminate()
        raise
    finally:
        receiver.close()
        process.join()


def run_case(case: Case, context: multiprocessing.context.BaseContext | None = None) -> dict[str, Any]:
    """Measures `case` and returns its JSON record: speed in one fresh worker process, memory in another."""
    context = context or _context()
    record = _base_record(case)
    for phase in ("speed", "memory"):
        status, payload = _run_worker(case, phase, context)
        if status != "ok":
            record.update(status=status, error=payload, items_per_s=None, peak_mem_bytes=None)
            break
        record.update(payload)
    return record


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _progress_line(index: int, total: int, case: Case) -> str:
    size = f"{case.size} {SIZE_UNITS[case.task]}"
    return f"[{index:>{len(str(total))}}/{total}] {case.task:<12} {case.model:<36} {size:>12}  batch {case.batch_size}"


def run_cases(cases: Sequence[Case], log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Measures every case, each in its own worker process, reporting progress to `log`; returns the records."""
    context = _context()
    records = []
    for index, case in enumerate(cases, 1):
        start = time.perf_counter()
        record = run_case(case, context)
        records.append(record)
        if log:
            if record["status"] == "ok":
                result = f"{record['items_per_s']:10.4g} {record['unit']}  {_mib(record['peak_mem_bytes']):>6} MiB"
            else:
                result = f"{record['status'].upper()}: {record['error'].splitlines()[0]}"
            log(f"{_progress_line(index, len(cases), case)}  {result}  ({time.perf_counter() - start:.1f} s)")
    return records


# ----------------------------------------------------------------------------------------------------------------
# planning


def plan_cases(
    tasks: Iterable[str],
    mode: str = "default",
    device: str = "cpu",
    dtype: str = "float32",
    models: Sequence[str] | None = None,
    sizes: dict[str, Sequence[int]] | None = None,
    batch_size: int | None = None,
    ar_depth: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
) -> list[Case]:
    """The cases of a run, in running order.

    Args:
        tasks: Tasks to run, from `TASKS`.
        mode: ``"default"``, ``"full"`` or ``"quick"`` (see `MODES`).
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"`` or ``"bfloat16"``.
        models: Only these models (timm names for vision tasks, `AR_MODELS` labels for the decoders); a task none of
            them belongs to gets no case.
        sizes: Sizes per task, replacing the mode's (attention baselines then run at every size).
        batch_size: Batch size for every task, replacing the mode's.
        ar_depth: Decoder depth, replacing the mode's.
        warmup: Untimed calls per case, replacing the mode's.
        repeats: Timed calls per case, replacing the mode's.
    """
    run = MODES[mode]
    cases = []
    for task in (t for t in TASKS if t in set(tasks)):
        plan = run.plans[task]
        task_sizes = tuple(sizes[task]) if sizes and task in sizes else plan.sizes
        limit = None if sizes and task in sizes else plan.baseline_max_size
        names = plan.models if models is None else [m for m in models if _model_fits(m, task)]
        for name in names:
            for size in task_sizes:
                case = Case(task, name, size, batch_size or plan.batch_size, device, dtype,
                            run.warmup if warmup is None else warmup, run.repeats if repeats is None else repeats,
                            (run.ar_depth if ar_depth is None else ar_depth) if task.startswith("ar") else None,
                            run.min_seconds)
                if limit is not None and case.baseline and size > limit:
                    continue
                cases.append(case)
    return cases


def _model_fits(name: str, task: str) -> bool:
    if task.startswith("ar"):
        return name in AR_MODELS and not (task == "ar-generate" and AR_MODELS[name][1] == "materialized")
    return name not in AR_MODELS and timm.is_model(name)


# ----------------------------------------------------------------------------------------------------------------
# reporting: tables, targets, plot


def _ok(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == "ok"]


def _find(records: Iterable[dict[str, Any]], task: str, model: str, size: int) -> dict[str, Any] | None:
    for r in _ok(records):
        if r["task"] == task and r["model"] == model and r["size"] == size:
            return r
    return None


def _cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    if record["status"] != "ok":
        return record["status"].upper()
    return f"{record['items_per_s']:.3g} ({_mib(record['peak_mem_bytes'])} MiB)"


def _setting(record: dict[str, Any]) -> str:
    """Device, dtype, batch size and decoder depth of a record, in words."""
    setting = f"{record['device']}, {record['dtype']}, batch {record['batch_size']}"
    return setting + (f", {record['ar_depth']} layers" if record.get("ar_depth") else "")


def format_tables(records: Sequence[dict[str, Any]]) -> str:
    """Markdown tables, one per task: a row per model, a column per size, cells 'items/s (peak MiB)'."""
    blocks = []
    for task in TASKS:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        sizes = sorted({r["size"] for r in rows})
        models = list(dict.fromkeys(r["model"] for r in rows))
        lines = [f"**{task}**: {UNITS[task]} (peak memory), {_setting(rows[0])}", "",
                 "| model | " + " | ".join(f"{s} {SIZE_UNITS[task]}" for s in sizes) + " |",
                 "|---|" + "---:|" * len(sizes)]
        for model in models:
            by_size = {r["size"]: r for r in rows if r["model"] == model}
            label = model + (" (baseline)" if rows and "aft" not in model else "")
            lines.append(f"| {label} | " + " | ".join(_cell(by_size.get(s)) for s in sizes) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


@dataclass
class TargetResult:
    """One promise of the package checked against a run: ``met`` is None when the run did not measure it."""

    name: str
    met: bool | None
    detail: str

    def __str__(self) -> str:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[self.met]
        return f"- {verdict:<12} {self.name}: {self.detail}"


def _speedup(record: dict[str, Any], reference: dict[str, Any]) -> tuple[float, str]:
    """Throughput ratio of `record` over `reference`, and that ratio in words."""
    ratio = record["items_per_s"] / reference["items_per_s"]
    return ratio, f"{ratio:.2f}x {record['unit']} ({record['items_per_s']:.4g} vs {reference['items_per_s']:.4g})"


def _vision_targets(records: Sequence[dict[str, Any]]) -> list[TargetResult]:
    results = []
    deit = "deit_tiny_patch16_224"
    conv_models = sorted({r["model"] for r in records if r["task"] == "vision-infer"
                          and r["model"].startswith("aft_conv_tiny")}) or ["aft_conv_tiny_h32_k11_patch16_224"]
    for model in conv_models:
        short = model.removesuffix("_patch16_224")
        name = f"vision 896 px: {short} >= 3x deit_tiny images/s, no more peak memory"
        base, aft = (_find(records, "vision-infer", m, 896) for m in (deit, model))
        if base and aft:
            speed, text = _speedup(aft, base)
            memory = aft["peak_mem_bytes"] / base["peak_mem_bytes"]
            results.append(TargetResult(name, speed >= 3 and memory <= 1, f"{text}, {memory:.2f}x memory"))
        else:
            results.append(TargetResult(name, None, "needs vision-infer of both at 896 px"))
        name = f"vision 224 px: {short} within 10% of deit_tiny images/s"
        base, aft = (_find(records, "vision-infer", m, 224) for m in (deit, model))
        if base and aft:
            speed, text = _speedup(aft, base)
            results.append(TargetResult(name, speed >= 0.9, text))
        else:
            results.append(TargetResult(name, None, "needs vision-infer of both at 224 px"))
    return results


def _ar_targets(records: Sequence[dict[str, Any]]) -> list[TargetResult]:
    results = []
    name = ("ar-train T=3072: aft-local-256 >= 1.5x transformer tokens/s, memory <= transformer's and <= 1/3 of "
            "transformer-materialized's")
    local, fused, explicit = (_find(records, "ar-train", m, 3072)
                              for m in ("aft-local-256", "transformer", "transformer-materialized"))
    if local and fused and explicit:
        speed, text = _speedup(local, fused)
        memory = local["peak_mem_bytes"] / fused["peak_mem_bytes"]
        memory_explicit = local["peak_mem_bytes"] / explicit["peak_mem_bytes"]
        results.append(TargetResult(name, speed >= 1.5 and memory <= 1 and memory_explicit <= 1 / 3,
                                    f"{text}, {memory:.2f}x transformer memory, {memory_explicit:.2f}x "
                                    f"transformer-materialized memory"))
    else:
        results.append(TargetResult(name, None, "needs ar-train of the three at 3072 tokens"))
    for model in ("aft-local-256", "aft-simple"):
        name = f"linear cost: {model} tokens/s at T=16384 within 1.5x of T=1024"
        short, long = (_find(records, "ar-train", model, t) for t in (1024, 16384))
        if short and long:
            slowdown = short["items_per_s"] / long["items_per_s"]
            results.append(TargetResult(name, slowdown <= 1.5, f"{slowdown:.2f}x slower per token "
                                        f"({short['items_per_s']:.4g} -> {long['items_per_s']:.4g} tokens/s)"))
        else:
            results.append(TargetResult(name, None, "needs ar-train at 1024 and 16384 tokens"))
    name = "ar-generate 3072 tokens: aft-local-256 >= 2x KV-cached transformer tokens/s, constant cost per token"
    local, cached = (_find(records, "ar-generate", m, 3072) for m in ("aft-local-256", "transformer"))
    if local and cached and "ms_per_token_first" in local:
        speed, text = _speedup(local, cached)
        growth = local["ms_per_token_last"] / local["ms_per_token_first"]
        results.append(TargetResult(name, speed >= 2 and growth <= 1.2,
                                    f"{text}; last/first {local['edge_tokens']} tokens {local['ms_per_token_last']:.2f}"
                                    f"/{local['ms_per_token_first']:.2f} ms = {growth:.2f}x"))
    else:
        results.append(TargetResult(name, None, "needs ar-generate of both at 3072 tokens"))
    return results


def evaluate_targets(records: Sequence[dict[str, Any]]) -> list[TargetResult]:
    """Checks the package's performance targets (issue 6) against measured records."""
    return _vision_targets(records) + _ar_targets(records)


_MARKERS = "osD^v<>ph*"


def write_plot(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Draws throughput and peak memory against size, log-scaled: one row per task, AFT solid, baselines dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    tasks = [t for t in TASKS if any(r["task"] == t for r in _ok(records))]
    if not tasks:
        raise ValueError("no successful measurement to plot")
    figure = Figure(figsize=(12, 3.6 * len(tasks)), layout="constrained")
    axes = figure.subplots(len(tasks), 2, squeeze=False)
    for row, task in zip(axes, tasks):
        rows = [r for r in _ok(records) if r["task"] == task]
        first = rows[0]
        for index, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
            points = sorted((r["size"], r["items_per_s"], r["peak_mem_bytes"]) for r in rows if r["model"] == model)
            sizes = [p[0] for p in points]
            style = dict(marker=_MARKERS[index % len(_MARKERS)], linestyle="--" if "aft" not in model else "-",
                         label=model + (" (baseline)" if "aft" not in model else ""))
            row[0].plot(sizes, [p[1] for p in points], **style)
            row[1].plot(sizes, [max(p[2], 1) / 2**20 for p in points], **style)
        setting = _setting(first)
        for ax, quantity in zip(row, (UNITS[task], "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"size ({SIZE_UNITS[task]})")
            ax.set_ylabel(quantity)
            ax.set_title(f"{task}: {quantity} ({setting})", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            sizes = sorted({r["size"] for r in rows})
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.xaxis.set_minor_formatter(NullFormatter())
            plain = FuncFormatter(lambda y, _: f"{y:.0f}" if y >= 1 else f"{y:.2g}")
            ax.yaxis.set_major_formatter(plain)
            low, high = ax.get_ylim()
            ax.yaxis.set_minor_formatter(plain if high / low < 30 else NullFormatter())  # label a narrow range
        row[0].legend(fontsize=7)
    write_atomic(path, lambda f: figure.savefig(f, format=Path(path).suffix.lstrip(".") or "png", dpi=110))


def write_json(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Writes the records as a JSON list, one object per case."""
    write_atomic(path, lambda f: f.write(json.dumps(list(records), indent=1).encode()))


# ----------------------------------------------------------------------------------------------------------------
# command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m aft_timm.benchmark``."""
    parser = argparse.ArgumentParser(
        prog="python -m aft_timm.benchmark",
        description="Throughput and peak memory of AFT models against attention baselines, side by side.",
        epilog=f"Vision models: {', '.join(VISION_TINY + VISION_SMALL)} (or any timm model name). "
               f"Decoders (ar-* tasks): {', '.join(AR_MODELS)}.",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), metavar="TASK",
                        help=f"tasks to run: {', '.join(TASKS)} (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default: cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype of weights and activations (default: float32)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the paper's models, sizes and batch sizes (24-layer decoders; meant for a GPU)")
    size.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (seconds)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these models")
    parser.add_argument("--image-sizes", nargs="+", type=_positive_int, metavar="PX",
                        help=f"image sizes of the vision tasks, multiples of {PATCH_SIZE}")
    parser.add_argument("--seq-lens", nargs="+", type=_positive_int, metavar="T",
                        help="sequence lengths of ar-train (attention baselines then run at every length)")
    parser.add_argument("--gen-tokens", nargs="+", type=_positive_int, metavar="T",
                        help="tokens ar-generate samples from the start token")
    parser.add_argument("--batch-size", type=_positive_int, metavar="N", help="batch size of every task")
    parser.add_argument("--ar-depth", type=_positive_int, metavar="L", help="layers of the decoders")
    parser.add_argument("--warmup", type=_non_negative_int, metavar="N", help="untimed calls per case")
    parser.add_argument("--repeats", type=_positive_int, metavar="N",
                        help="timed calls per case, at least (median reported)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write one JSON record per case to FILE")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="draw throughput and memory against size to FILE")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects what would only fail minutes into the run."""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available to torch here (torch.cuda.is_available() is False)")
        if args.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            parser.error("--dtype bfloat16: this GPU does not support bfloat16")
    for size in args.image_sizes or ():
        if size % PATCH_SIZE:
            parser.error(f"--image-sizes: {size} is not a multiple of the patch size {PATCH_SIZE}")
    for length in args.seq_lens or ():
        if length < 2:
            parser.error(f"--seq-lens: {length} is too short (at least 2 tokens)")
    if args.models:
        unknown = [m for m in args.models if not any(_model_fits(m, t) for t in TASKS)]
        if unknown:
            parser.error(f"--models: unknown model(s) {', '.join(unknown)}; vision tasks take timm model names "
                         f"(e.g. {', '.join(VISION_TINY[:2])}), ar tasks take {', '.join(AR_MODELS)}")
        if not any(_model_fits(m, t) for m in args.models for t in args.tasks):
            parser.error(f"--models: none of {', '.join(args.models)} runs in the selected tasks "
                         f"({', '.join(args.tasks)})")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{option}: directory {path.parent} does not exist")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'aft-timm[plot]'")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark from command-line arguments; returns the exit status (1 when a case failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    mode = "full" if args.full else "quick" if args.quick else "default"
    sizes = {task: values for task, values in (("vision-infer", args.image_sizes), ("vision-train", args.image_sizes),
                                                ("ar-train", args.seq_lens), ("ar-generate", args.gen_tokens))
             if values}
    cases = plan_cases(args.tasks, mode, args.device, args.dtype, args.models, sizes, args.batch_size,
                       args.ar_depth, args.warmup, args.repeats)
    if not cases:
        parser.error("nothing to run: the selected models do not belong to the selected tasks")
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731  progress goes to stderr
    log(f"aft_timm {aft_timm.__version__} benchmark ({mode}): {len(cases)} cases on {args.device}{threads}, "
        f"{args.dtype}, torch {torch.__version__}")
    load, cpus = _load_average(), os.cpu_count() or 1
    if args.device == "cpu" and load is not None and load > cpus / 2:
        log(f"warning: the system load average is {load:.1f} on {cpus} CPUs: other processes compete for them and "
            f"the numbers will be noisy (each record carries the load average when its case ran; OMP_NUM_THREADS=1 "
            f"keeps threads from waiting on each other, at the cost of parallelism)")
    start = time.perf_counter()
    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None  # stop the worker too
    try:
        records = run_cases(cases, log)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    log(f"done in {time.perf_counter() - start:.0f} s")
    print(format_tables(records))
    targets = [t for t in evaluate_targets(records) if t.met is not None]
    if targets:
        print("\nTargets (issue 6):")
        print("\n".join(str(t) for t in targets))
    if args.json is not None:
        write_json(records, args.json)
        log(f"wrote {len(records)} records to {args.json}")
    if args.plot is not None and _ok(records):
        write_plot(records, args.plot)
        log(f"wrote plot to {args.plot}")
    failed = [r for r in records if r["status"] == "error"]
    if failed:
        log(f"{len(failed)} case(s) failed:\n" + "\n".join(f"{r['task']} {r['model']} {r['size']}: {r['error']}"
                                                           for r in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
