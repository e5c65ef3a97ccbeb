"""The one atomic file writer: a temporary file beside the target, renamed over it when complete.

Why one place: writers create their temporary file in different ways (``safetensors.save_file``
and ``tempfile.mkstemp`` make it 0600, ``open`` honours the umask), and the rename keeps that
mode. A LoRA written 0600 cannot be read by the other tools and users of a shared WebUI folder,
so every atomic write ends here, where the file gets the mode a plain ``open`` would have given it.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Union


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (other threads write files too)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    umask = os.umask(0o022)          # no /proc: the only portable way is to set it and put it back
    os.umask(umask)
    return umask


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, give the written
    file the plain mode, flush it to disk and rename it over ``path``. On error it is removed, so a
    crash never leaves a half-written file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.chmod(tmp, plain_file_mode())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
