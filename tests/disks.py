"""Filling a real filesystem (the ``small_disk`` tmpfs of conftest.py) for full-disk tests."""
from __future__ import annotations

import os
from pathlib import Path


def fill(disk: Path) -> None:
    """Write to ``disk`` until the filesystem is full: every further write fails with ENOSPC."""
    fd = os.open(Path(disk) / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
