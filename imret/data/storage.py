"""Where shards live: a local directory or a URL (`s3://bucket/prefix`, `gs://bucket/prefix`, `https://host/path`),
behind one small interface, so the rest of imret never asks which.

Local locations are plain files. URLs go through fsspec; its S3 and GCS implementations are optional extras
(`pip install s3fs`, `pip install gcsfs`). S3 takes its endpoint and credentials from the standard variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` or `AWS_REGION`), GCS from
`GOOGLE_APPLICATION_CREDENTIALS`. Remote calls are retried here, and only here: a transient failure (a reset or
refused connection, a timeout, a 5xx) up to ATTEMPTS times with doubling pauses; a missing object or a refusal
never. Every failure becomes one DataError line that names the location.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

from imret.errors import DataError, ImretError, write_failed

log = logging.getLogger("imret.data")
ATTEMPTS, BACKOFF_S = 5, 0.5  # pauses of 0.5, 1, 2 and 4 s: about 8 s before a remote failure is final
BLOCK = 8 << 20  # bytes per ranged request when streaming a remote object
PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
CREDENTIALS = {"s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a store other than AWS)",
               "gs": "GOOGLE_APPLICATION_CREDENTIALS", "gcs": "GOOGLE_APPLICATION_CREDENTIALS"}  # fmt: skip
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
T = TypeVar("T")


class NotFound(DataError):
    """The location holds no such file or object."""


class Location(str):
    """A local path or a URL, kept as the string it was given (it pickles into loader workers and prints as
    typed), with a Path's `name` and `stem` for naming what is derived from one shard."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        name = self.name
        return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def is_remote(location: str | Path) -> bool:
    return SCHEME.match(str(location)) is not None


def join(location: str | Path, name: str) -> Location:
    text = str(location)
    return Location(f"{text.rstrip('/')}/{name}" if is_remote(text) else os.path.join(text, name))


def require_local(location: str | Path | None, setting: str) -> None:
    if location is not None and is_remote(location):
        raise ImretError(f"{setting} {location}: run directories, checkpoints and embeddings stay on a local or shared "
                         f"disk; only shard locations may be URLs")  # fmt: skip


# ---------------------------------------------------------------- reading


class Reader:
    """A file read front to back, its size known at open when the store tells it. A remote one that fails
    transiently mid-read is reopened at the offset reached: the caller never sees a seam."""

    def __init__(self, location: str):
        self.location = Location(location)
        self._offset = 0
        self._file: BinaryIO | None = None
        self._fs = _filesystem_for(location) if is_remote(location) else None
        if self._fs is None:
            self._file = _local(location, lambda: open(location, "rb"))
            self.size: int | None = os.fstat(self._file.fileno()).st_size
        else:
            self._file = _retrying(location, self._open_remote)
            self.size = getattr(self._file, "size", None)

    def _open_remote(self) -> BinaryIO:
        handle = self._fs.open(self.location, "rb", block_size=BLOCK, cache_type="readahead")
        if self._offset:
            handle.seek(self._offset)
        return handle

    def read(self, n: int = -1) -> bytes:
        if self._fs is None:
            return _local(self.location, lambda: self._file.read(n))
        data = _retrying(self.location, lambda: self._read_remote(n))
        self._offset += len(data)
        return data

    def _read_remote(self, n: int) -> bytes:
        try:
            if self._file is None:
                self._file = self._open_remote()
            return self._file.read(n)
        except BaseException:
            self._drop()  # reopened at the offset on the next try
            raise

    def _drop(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                handle.close()

    def close(self) -> None:
        self._drop()


def read_range(location: str | Path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of one file (a thumbnail's bytes in a shard): one ranged request when remote."""
    if not is_remote(location):

        def read() -> bytes:
            with open(location, "rb") as handle:
                handle.seek(offset)
                return handle.read(size)

        return _local(location, read)
    fs = _filesystem_for(location)
    return _retrying(location, lambda: fs.cat_file(str(location), start=offset, end=offset + size))


def open_seekable(location: str | Path) -> BinaryIO:
    """A file to seek in (a tar's headers, skipping its members' data): a local file, or fsspec's buffered
    remote file, which fetches only the blocks read."""
    if not is_remote(location):
        return _local(location, lambda: open(location, "rb"))
    fs = _filesystem_for(location)
    return _retrying(location, lambda: fs.open(str(location), "rb", block_size=1 << 16))


def read_bytes(location: str | Path) -> bytes:
    """A whole (small) file: a source image, a mask, an annotation."""
    if not is_remote(location):
        return _local(location, lambda: Path(location).read_bytes())
    fs = _filesystem_for(location)
    return _retrying(location, lambda: fs.cat_file(str(location)))


def read_text(location: str | Path) -> str:
    if not is_remote(location):
        return _local(location, lambda: Path(location).read_text(encoding="utf-8"))
    fs = _filesystem_for(location)
    return _retrying(location, lambda: fs.cat_file(str(location))).decode("utf-8")


def exists(location: str | Path) -> bool:
    """A file, or a directory or prefix with something in it."""
    if not is_remote(location):
        return Path(location).exists()
    fs = _filesystem_for(location)
    return _retrying(location, lambda: fs.exists(str(location)))


def size(location: str | Path) -> int | None:
    """A file's size in bytes, or None when there is no such file."""
    if not is_remote(location):
        return Path(location).stat().st_size if Path(location).is_file() else None
    fs = _filesystem_for(location)
    try:
        return int(_retrying(location, lambda: fs.size(str(location))))
    except NotFound:
        return None


def listdir(location: str | Path) -> list[str]:
    """The names directly in a directory or under a prefix; none when it does not exist."""
    if not is_remote(location):
        return sorted(p.name for p in Path(location).iterdir()) if Path(location).is_dir() else []
    fs = _filesystem_for(location)
    try:
        found = _retrying(location, lambda: fs.ls(str(location), detail=False))
    except NotFound:
        return []
    return sorted(Location(path).name for path in found)


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def staging_dir(location: str | Path) -> Iterator[Path]:
    """Where finished files are made before `put_file` publishes them: the directory itself when it is local
    (a rename publishes), a temporary directory on this machine when it is remote (an upload publishes)."""
    if not is_remote(location):
        _local(location, lambda: Path(location).mkdir(parents=True, exist_ok=True))
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="imret-stage-") as stage:
        yield Path(stage)


def put_file(path: Path, location: str | Path) -> None:
    """Publish a finished file, whole: a reader of `location` sees nothing or all of it. The file at `path`
    is moved, not copied."""
    if not is_remote(location):
        _local(location, lambda: os.replace(path, location))
        return
    fs = _filesystem_for(location)
    _retrying(location, lambda: fs.put_file(str(path), str(location)))  # an object appears only once complete
    path.unlink()


def write_text(location: str | Path, text: str) -> None:
    """Replace a small file in one step: a reader sees the old one or the whole new one."""
    if is_remote(location):
        fs = _filesystem_for(location)
        _retrying(location, lambda: fs.pipe_file(str(location), text.encode("utf-8")))
        return
    path = Path(location)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two processes writing one file never share a draft
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(str(write_failed(path, exc, len(text.encode("utf-8"))))) from None


def remove(location: str | Path) -> None:
    if not is_remote(location):
        _local(location, lambda: Path(location).unlink(missing_ok=True))
        return
    fs = _filesystem_for(location)
    with contextlib.suppress(NotFound):
        _retrying(location, lambda: fs.rm_file(str(location)))


# ---------------------------------------------------------------- clients, retries and errors


def _filesystem_for(location: str | Path) -> Any:
    scheme = SCHEME.match(str(location)).group(1).lower()
    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_"))))
    try:
        return _filesystem(scheme, os.getpid(), settings)
    except ImportError:
        package = PACKAGES.get(scheme, "fsspec")
        raise DataError(f"{location}: reading {scheme}:// locations needs {package}: pip install {package}") from None
    except ValueError:
        raise DataError(f"{location}: imret reads local paths, s3://, gs:// and https:// locations, not {scheme}://") from None


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, pid: int, settings: tuple[tuple[str, str], ...]) -> Any:
    """One client per scheme, process and AWS_/GOOGLE_ settings: a forked loader worker must not use its
    parent's event loop, and changed credentials need a new client (fsspec's own cache keys on neither)."""
    import fsspec

    options: dict[str, Any] = {}
    if scheme == "s3":
        options["config_kwargs"] = {"retries": {"mode": "standard", "total_max_attempts": 1}}  # retried in _retrying
        region = dict(settings).get("AWS_REGION")
        if region:  # botocore itself reads only AWS_DEFAULT_REGION
            options["client_kwargs"] = {"region_name": region}
    fs = fsspec.filesystem(scheme, skip_instance_cache=True, **options)
    if scheme == "s3":
        fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    return fs


def _retrying(location: str | Path, call: Callable[[], T]) -> T:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 (classified here, and anything else is re-raised as one line)
            if not _transient(exc) or attempt == ATTEMPTS:
                raise _error(location, exc, attempt) from None
            pause = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s: %s; trying again in %.1f s (%d of %d)", location, _reason(exc), pause, attempt + 1, ATTEMPTS)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _local(location: str | Path, call: Callable[[], T]) -> T:
    try:
        return call()
    except FileNotFoundError:
        raise NotFound(f"{location}: not found") from None
    except OSError as exc:
        raise DataError(f"{location}: {exc.strerror or exc}") from None


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, _transient_types()):
        return True
    return any(status is not None and (status >= 500 or status == 429) for status in map(_http_status, _chain(exc)))


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError

        types += [BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    return tuple(types)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes: s3fs turns a botocore error into an OSError caused by it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    status = getattr(exc, "status", None)  # aiohttp's ClientResponseError
    return status if isinstance(status, int) else None


def _error(location: str | Path, exc: BaseException, attempts: int) -> DataError:
    scheme = match.group(1).lower() if (match := SCHEME.match(str(location))) else ""
    names = {type(e).__name__ for e in _chain(exc)}
    statuses = {_http_status(e) for e in _chain(exc)}
    if isinstance(exc, FileNotFoundError) or 404 in statuses:
        return NotFound(f"{location}: not found")
    if {"NoCredentialsError", "PartialCredentialsError"} & names:
        return DataError(f"{location}: no credentials: set {CREDENTIALS.get(scheme, 'the credentials')}")
    if isinstance(exc, PermissionError) or statuses & {401, 403}:
        return DataError(f"{location}: access denied ({_reason(exc)}): check {CREDENTIALS.get(scheme, 'the credentials')}")
    if isinstance(exc, NotImplementedError):
        return DataError(f"{location}: {scheme}:// locations can be read, not written: use a local directory or s3:// or gs://")
    tries = f" (gave up after {attempts} tries)" if attempts > 1 else ""
    return DataError(f"{location}: {_reason(exc)}{tries}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
