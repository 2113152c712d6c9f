"""Writing files the safe way: to a temporary file beside the destination, then one rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import UsageError


def atomic_write(destination: str | os.PathLike, save: Callable[[str], None],
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Call ``save(tmp_path)`` and rename the result to ``destination``: never a half-written file, never over
    one of ``inputs``."""
    destination = Path(destination)
    for source in inputs:
        if destination.exists() and os.path.samefile(destination, source):
            raise UsageError(f"refusing to overwrite the input {source}: give another output path.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(suffix=destination.suffix, prefix=f".{destination.name}.", dir=destination.parent)
    os.close(handle)
    try:
        save(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the permissions a plain open() would
        os.replace(tmp, destination)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return destination
