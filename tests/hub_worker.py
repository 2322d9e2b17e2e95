"""A Python process that runs test snippets with ``huggingface_hub`` pointed at a local Hub.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` once, when it is imported, and timm
imports it as soon as timm is imported. The test process cannot re-point it without patching the library, so the
client side of the Hub tests runs here, in a child process started with the right environment. ``HubWorker`` (test
side) sends snippets as JSON lines on stdin; each snippet runs in one persistent namespace and may set ``result`` to
a JSON-serializable value. The answer line is ``{"ok": true, "result": ...}`` or ``{"ok": false, "type": ...,
"types": [...], "message": ...}`` for an exception. Anything the snippets print goes to stderr, so stdout carries
answers only.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Mapping

_CLEARED_ENV = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER", "HF_XET_HIGH_PERFORMANCE", "TIMM_FUSED_ATTN",
    "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
)


class WorkerError(Exception):
    """An exception raised inside the worker, with its type names and message."""

    def __init__(self, type_name: str, types: list[str], message: str, trace: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.types = types
        self.message = message
        self.trace = trace


class HubWorker:
    """A child Python process with ``HF_ENDPOINT`` set before anything imports ``huggingface_hub``.

    Args:
        endpoint: The Hub URL (``LocalHub.url``).
        hf_home: ``HF_HOME`` for the child (its cache lives in ``hf_home/hub``).
        offline: Start it with ``HF_HUB_OFFLINE=1``.
        log_path: Where the child's stderr goes (default: a file beside ``hf_home``).
    """

    def __init__(self, endpoint: str, hf_home: Path, offline: bool = False, log_path: Path | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
        repo_root = Path(__file__).resolve().parents[1]
        env.update(
            HF_ENDPOINT=endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            TORCH_HOME=str(Path(hf_home) / "torch"),
            NO_PROXY="127.0.0.1,localhost",
            PYTHONPATH=os.pathsep.join([str(repo_root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        self.log_path = Path(log_path or Path(hf_home).with_name(Path(hf_home).name + "-worker.log"))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env=env, cwd=str(repo_root), text=True, bufsize=1,
        )

    def run(self, code: str, timeout: float = 300, **values: Any) -> Any:
        """Run ``code`` in the child (``values`` are bound as variables first) and return its ``result``.

        Raises:
            WorkerError: The snippet raised.
            RuntimeError: The child died, or gave no answer within ``timeout`` seconds (it is then killed).
        """
        request = json.dumps({"code": code, "values": values})
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(request + "\n")
        self._proc.stdin.flush()
        # One request, one answer line: nothing is left in the pipe's buffer between calls, so select() is exact.
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            self._proc.kill()
            raise RuntimeError(f"hub worker gave no answer in {timeout} s; its log:\n{self.log()}")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"hub worker died; its log:\n{self.log()}")
        answer = json.loads(line)
        if answer["ok"]:
            return answer["result"]
        raise WorkerError(answer["type"], answer["types"], answer["message"], answer["trace"])

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def __enter__(self) -> "HubWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # print() and C-level writes of the snippets go to stderr
    sys.stdout = sys.stderr
    namespace: dict[str, Any] = {"__name__": "hub_worker_snippet"}
    for line in sys.stdin:
        request: Mapping[str, Any] = json.loads(line)
        namespace.update(request["values"])
        namespace["result"] = None
        try:
            exec(compile(request["code"], "<snippet>", "exec"), namespace)
            answer = {"ok": True, "result": namespace["result"]}
        except BaseException as e:  # noqa: BLE001 (every failure goes back to the test)
            types = [f"{t.__module__}.{t.__qualname__}" for t in type(e).__mro__]
            answer = {"ok": False, "type": types[0], "types": types, "message": str(e),
                      "trace": traceback.format_exc()}
            traceback.print_exc()
        answers.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    _serve()
