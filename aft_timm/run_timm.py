"""Run one of timm's scripts (validate.py, inference.py, benchmark.py, train.py) unchanged, with aft models registered.

timm has no plugin discovery: a model exists once the module that defines it is imported. ``train.py`` has
``--device-modules aft_timm`` for that; the other scripts have no such hook. This runner imports ``aft_timm`` and
then executes the script as ``__main__``, exactly as ``python path/to/script.py ARGS...`` would::

    python -m aft_timm.run_timm path/to/pytorch-image-models/validate.py --model aft_conv_tiny_h32_k11_patch16_224 \
        --data-dir /data/imagenet --checkpoint output/train/.../model_best.pth.tar
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

_USAGE = """usage: python -m aft_timm.run_timm SCRIPT [ARGS...]

Runs SCRIPT (timm's validate.py, inference.py, benchmark.py or train.py) as __main__ after importing aft_timm, so
the aft_* models are known to timm. ARGS go to the script unchanged.

timm's scripts are not part of the timm wheel; get the ones matching your timm with
  git clone --branch "v$(python -c 'import timm; print(timm.__version__)')" \\
      https://github.com/huggingface/pytorch-image-models"""


def main(argv: list[str] | None = None) -> None:
    """Import ``aft_timm`` and run ``argv[0]`` as ``__main__`` with ``sys.argv = argv``.

    Args:
        argv: The script path followed by its arguments (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(0 if argv else 2)
    script = Path(argv[0])
    if not script.is_file():
        print(f"aft_timm.run_timm: error: script '{script}' does not exist.\n\n{_USAGE}", file=sys.stderr)
        raise SystemExit(2)

    import aft_timm  # noqa: F401  (registers the aft_* models with timm)

    script_dir = str(script.resolve().parent)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, script_dir)  # as the interpreter does for `python script.py`: sibling imports resolve
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        if sys.path and sys.path[0] == script_dir:
            sys.path.pop(0)


if __name__ == "__main__":
    main()
