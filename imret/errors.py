"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import difflib
import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator


class ImretError(Exception):
    """Bad input from the user (a recipe, a dataset, a path): the message says what and where."""


class RecipeError(ImretError):
    pass


class DataError(ImretError):
    pass


def did_you_mean(word: str, options: Iterable[str], n: int = 1) -> str:
    """A typo's hint: " (did you mean 'x'?)", or up to n close matches, or nothing."""
    close = difflib.get_close_matches(str(word), list(options), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def one_line(exc: ImretError) -> str:
    """The error's message. One raised in a DataLoader worker reaches the main process as torch's "Caught
    DataError in DataLoader worker process N." and the worker's traceback, whose last line holds the message."""
    text = str(exc)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]  # "imret.errors.DataError: <the message>"
        return last.split(": ", 1)[-1]
    return text


def write_failed(path: str | Path, exc: OSError, size: int | None = None) -> ImretError:
    """One line for a write that failed, naming the file; for a full disk (or quota), how much is free there and,
    when known, how much the write needed."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = f", {readable_size(size)} to write" if size else ""
        reason += f" ({readable_size(free_space(Path(path)))} free{needed})"
    return ImretError(f"writing {path} failed: {reason}")


def free_space(path: Path) -> int:
    """Bytes free on the filesystem that holds `path` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def readable_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


@contextmanager
def writing(path: str | Path, size: int | None = None, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """A block of writes to `path`: an OSError (a full disk, a quota, a read-only mount) removes what was half
    written (`cleanup`) and becomes one line naming the path, the space free and the size needed."""
    try:
        yield
    except OSError as exc:
        if cleanup is not None:
            cleanup()
        raise write_failed(path, exc, size) from None
