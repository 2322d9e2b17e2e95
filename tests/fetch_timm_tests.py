"""Fetch timm's own test files (shipped in its source distribution, not in the wheel) for the conformance tests.

Usage: python tests/fetch_timm_tests.py

Downloads the sdist of the installed timm version with pip and extracts its tests/*.py into tests/.timm_upstream/
(git-ignored; the files are timm's, used as-is and never committed). Needs access to the package index once.
"""
import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

UPSTREAM_DIR = Path(__file__).resolve().parent / '.timm_upstream'


def _extract_tests(archive: Path, dest: Path) -> list:
    """Copy timm-X/tests/*.py of the sdist archive into dest; returns the file names."""
    written = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == 'tests' and parts[2].endswith('.py') and member.isfile():
                (dest / parts[2]).write_bytes(tar.extractfile(member).read())
                written.append(parts[2])
    if 'test_models.py' not in written:
        raise SystemExit(f'{archive.name} has no tests/test_models.py (found: {sorted(written)})')
    return written


def fetch(version: str, dest: Path) -> list:
    """Download timm==version's sdist and copy its top-level tests/*.py into dest; returns the files written."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-deps', '--no-binary', ':all:',
               '--dest', tmp, '--quiet']
        print(f'Downloading the timm {version} source distribution ...', flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f'pip download failed (exit {result.returncode}):\n{result.stderr.strip()}')
        archives = sorted(Path(tmp).glob('timm-*.tar.gz'))
        if not archives:
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise SystemExit(f'pip download produced no timm-*.tar.gz, only {found}')

        staging = Path(tempfile.mkdtemp(prefix='.timm_upstream.', dir=dest.parent))
        try:
            written = _extract_tests(archives[0], staging)
            (staging / 'TIMM_VERSION').write_text(version + '\n')
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # swap the directory in whole, so a failed or interrupted fetch never leaves a half-written copy
    if dest.exists():
        old = dest.with_name(dest.name + '.old')
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old)
    else:
        staging.rename(dest)
    return sorted(written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--version', default=timm.__version__, help='timm version (default: the installed one)')
    args = parser.parse_args()
    files = fetch(args.version, UPSTREAM_DIR)
    print(f'Wrote {len(files)} files of timm {args.version} tests to {UPSTREAM_DIR}')


if __name__ == '__main__':
    main()
