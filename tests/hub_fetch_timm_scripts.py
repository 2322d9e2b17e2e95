"""Copy timm's command-line scripts into tests/.timm_upstream/scripts/ for tests/test_timm_scripts.py.

timm's train.py, validate.py, inference.py and benchmark.py ship in neither the timm wheel nor its source
distribution on PyPI, so they come from a pytorch-image-models checkout (or an archive of one) that you point at:

    git clone --branch "v$(python -c 'import timm; print(timm.__version__)')" \\
        https://github.com/huggingface/pytorch-image-models /tmp/pytorch-image-models
    python tests/hub_fetch_timm_scripts.py --from /tmp/pytorch-image-models

The tests also accept TIMM_SCRIPTS_DIR=/path/to/pytorch-image-models directly; without either, they are skipped.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

SCRIPTS = ("train.py", "validate.py", "inference.py", "benchmark.py")
DEST = Path(__file__).resolve().parent / ".timm_upstream" / "scripts"


def _from_archive(archive: Path) -> dict[str, bytes]:
    """The scripts at the top level of the (single) root folder of a .tar.gz or .zip of the repository."""
    found: dict[str, bytes] = {}
    pattern = re.compile(r"^[^/]+/(%s|timm/version\.py)$" % "|".join(map(re.escape, SCRIPTS)))
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if pattern.match(name):
                    found[name.split("/", 1)[1]] = zf.read(name)
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and pattern.match(member.name):
                    extracted = tf.extractfile(member)
                    assert extracted is not None
                    found[member.name.split("/", 1)[1]] = extracted.read()
    return found


def _from_dir(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in (*SCRIPTS, "timm/version.py") if (root / name).is_file()}


def _version(source: dict[str, bytes]) -> str | None:
    match = re.search(rb"__version__\s*=\s*['\"]([^'\"]+)['\"]", source.get("timm/version.py", b""))
    return match[1].decode() if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, type=Path,
                        help="a pytorch-image-models checkout, or a .tar.gz / .zip archive of one")
    parser.add_argument("--dest", type=Path, default=DEST, help=f"where the scripts go (default: {DEST})")
    args = parser.parse_args(argv)

    if args.source.is_dir():
        found = _from_dir(args.source)
    elif args.source.is_file():
        found = _from_archive(args.source)
    else:
        print(f"error: '{args.source}' is neither a folder nor an archive", file=sys.stderr)
        return 2
    missing = [name for name in SCRIPTS if name not in found]
    if missing:
        print(f"error: '{args.source}' has no {', '.join(missing)} at its top level: is it a pytorch-image-models "
              f"checkout?", file=sys.stderr)
        return 2

    import timm

    source_version = _version(found)
    if source_version is not None and source_version.split(".dev")[0] != timm.__version__:
        print(f"warning: the scripts come from timm {source_version}, the installed timm is {timm.__version__}",
              file=sys.stderr)

    # Write into a temporary folder beside the destination, then swap it in: readers never see half a copy.
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".scripts-", dir=args.dest.parent))
    staging.chmod(0o755)
    for name in SCRIPTS:
        (staging / name).write_bytes(found[name])
    (staging / "SOURCE").write_text(f"{args.source}\ntimm {source_version or 'unknown'}\n")
    if args.dest.exists():
        shutil.rmtree(args.dest)
    staging.rename(args.dest)
    print(f"copied {', '.join(SCRIPTS)} (timm {source_version or 'unknown'}) to {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
