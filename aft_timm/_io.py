"""File helpers shared by the training code and the benchmark."""
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union


def write_atomic(path: Union[str, os.PathLike], write: Callable[[BinaryIO], object]) -> None:
    """Writes through ``write(file)`` into a temporary file beside ``path``, syncs it, then renames it over ``path``.

    Readers see the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
