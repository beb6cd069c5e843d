"""`imret serve INDEX_DIR...`: the search page and its HTTP API, on FastAPI and uvicorn.

INDEX_DIR is an index directory, or a study's output directory (every compared model, original and masked).
Models and indexes load once, before the port opens. One thread owns the device (`Batcher`): the queries
that arrive while it is busy, or within a few milliseconds of each other, are embedded in one forward pass and
searched in one FAISS call. Uploads stay in memory (Starlette keeps a file part in memory up to its
`spool_max_size`, set here to the body cap, which FastAPI enforces with a 413 even for chunked bodies); an
image that does not decode is a 400, a key that is not in a lookup a 404, and nothing reaches the
filesystem but byte ranges of the shards the lookups list. The page is one HTML file with its script and
style inline: no build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser

from imret.data.lookup import Lookup
from imret.errors import ImretError
from imret.search import MAX_K, Gallery, Neighbour, check_k, find_indexes

log = logging.getLogger("imret.serve")
BATCH_WINDOW_S = 0.003  # how long the first query of a batch waits for company
EXAMPLES_MAX = 24


# ---------------------------------------------------------------- what is served


def load_catalogue(paths: list[str]) -> dict[str, dict[str, Gallery]]:
    """model name -> variant -> its loaded gallery; each model is loaded once for all its galleries."""
    models: dict[str, Any] = {}
    catalogue: dict[str, dict[str, Gallery]] = defaultdict(dict)
    for name, variant, path in find_indexes(paths):
        log.info("loading %s (%s): %s", name, variant, path)
        catalogue[name][variant] = Gallery(path, masked=variant == "masked", models=models)
    return dict(catalogue)


# ---------------------------------------------------------------- batching on the device


@dataclass
class Query:
    gallery: Gallery
    image: torch.Tensor
    k: int
    labels: np.ndarray | None
    future: Future


class Batcher:
    """One thread owns the device. It takes a query and every query already waiting and, when there were
    some, those that arrive within BATCH_WINDOW_S of the first (at most `max_batch` in all), embeds each
    gallery's share in one forward pass and searches it in one FAISS call. max_batch=1 answers one query at
    a time (the baseline `imret bench serve` measures)."""

    def __init__(self, max_batch: int = 32):
        self.max_batch = max_batch
        self.queue: queue.Queue[Query] = queue.Queue()
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size were answered
        threading.Thread(target=self._run, name="imret-batcher", daemon=True).start()

    def submit(self, gallery: Gallery, image: torch.Tensor, k: int, labels: np.ndarray | None) -> Future:
        future: Future = Future()
        self.queue.put(Query(gallery, image, k, labels, future))
        return future

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + BATCH_WINDOW_S
            while len(batch) < self.max_batch:
                # what is waiting is always taken; company is waited for only once there is some (a lone
                # client would otherwise pay the window on every query)
                wait = deadline - time.monotonic() if len(batch) > 1 else 0.0
                try:
                    batch.append(self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            self.batch_sizes[len(batch)] += 1
            by_gallery: dict[int, list[Query]] = defaultdict(list)
            for query in batch:  # a query whose client went away is cancelled: answering it would raise here
                if query.future.set_running_or_notify_cancel():
                    by_gallery[id(query.gallery)].append(query)
            for queries in by_gallery.values():
                self._answer(queries)

    @staticmethod
    def _answer(queries: list[Query]) -> None:
        gallery, k = queries[0].gallery, max(q.k for q in queries)
        try:
            found = gallery.neighbours(gallery.embed([q.image for q in queries]), k, [q.labels for q in queries])
        except Exception as exc:  # the requests hear of it; the device thread goes on
            for query in queries:
                query.future.set_exception(exc)
            return
        for query, neighbours in zip(queries, found):
            query.future.set_result(neighbours[: query.k])


# ---------------------------------------------------------------- the app


def create_app(catalogue: dict[str, dict[str, Gallery]], max_upload_bytes: int, batcher: Batcher) -> FastAPI:
    MultiPartParser.spool_max_size = max_upload_bytes  # an upload never spills to a temporary file
    app = FastAPI(title="imret search", max_body_size=max_upload_bytes, docs_url=None, redoc_url=None)
    page = files("imret").joinpath("web/index.html").read_text(encoding="utf-8")
    lookups = unique_lookups(catalogue)
    first = next(iter(next(iter(catalogue.values())).values()))  # every served gallery has the same examples

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ImretError)
    async def bad_input(request: Request, exc: ImretError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'request'}: {e['msg']}" for e in exc.errors())
        return error(400, problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> str:
        return page

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": len(catalogue), "batch_sizes": dict(sorted(batcher.batch_sizes.items()))}

    @app.get("/indexes")
    def indexes() -> dict[str, Any]:
        return {"models": [describe(name, variants) for name, variants in catalogue.items()], "max_k": MAX_K}

    @app.post("/search")
    async def search(image: UploadFile = File(...), k: int = Form(5), masked: bool = Form(False),
                     model: str | None = Form(None), tags: str | None = Form(None)) -> dict[str, Any]:  # fmt: skip
        gallery, name = pick(catalogue, model, masked)
        check_k(k, gallery.index.ntotal)
        labels = gallery.parse_tags(tags) if tags else None
        decoded = await run_in_threadpool(gallery.decode, await image.read())
        neighbours = await asyncio.wrap_future(batcher.submit(gallery, decoded, k, labels))
        return {"model": name, "variant": "masked" if masked else "original", "k": k,
                "query_tags": gallery.tag_names(labels) if labels is not None else None,
                "neighbours": [row(n) for n in neighbours]}  # fmt: skip

    @app.get("/thumb/{key}")
    def thumb(key: str) -> Response:
        for lookup in lookups:
            found = lookup.find(key)
            if found is not None:
                data, media_type = lookup.image(found)
                return Response(data, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})
        return error(404, f"no image with the key {key!r} in the served indexes")

    @app.get("/examples")
    def example_images(n: int = 8) -> dict[str, Any]:
        """n random images of the validation split (never in the gallery) to try."""
        lookup = first.examples
        rows = np.random.default_rng().choice(len(lookup), size=min(max(n, 0), EXAMPLES_MAX, len(lookup)), replace=False)
        return {"examples": [{"key": lookup.key(int(r)), "tags": [first.classes[i] for i in lookup.labels(int(r))],
                              "thumb": f"/thumb/{quote(lookup.key(int(r)))}"} for r in rows]}  # fmt: skip

    return app


def pick(catalogue: dict[str, dict[str, Gallery]], model: str | None, masked: bool) -> tuple[Gallery, str]:
    name = model or next(iter(catalogue))
    if name not in catalogue:
        raise ImretError(f"no model '{name}' here; served: {', '.join(catalogue)}")
    variant = "masked" if masked else "original"
    if variant not in catalogue[name]:
        raise ImretError(f"model '{name}' has no {variant} index here")
    return catalogue[name][variant], name


def row(neighbour: Neighbour) -> dict[str, Any]:
    return {**asdict(neighbour), "thumb": f"/thumb/{quote(neighbour.key)}"}


def describe(name: str, variants: dict[str, Gallery]) -> dict[str, Any]:
    gallery = next(iter(variants.values()))
    return {"name": name, "variants": list(variants), "gallery": int(gallery.index.ntotal), "dim": int(gallery.index.d),
            "layer": gallery.sidecar["layer"], "classes": gallery.classes}  # fmt: skip


def unique_lookups(catalogue: dict[str, dict[str, Gallery]]) -> list[Lookup]:
    """Each served shard split once (a study's galleries all index the same train split)."""
    lookups: dict[tuple[str, str], Lookup] = {}
    for variants in catalogue.values():
        for gallery in variants.values():
            for lookup in (gallery.lookup, gallery.examples):
                lookups.setdefault((lookup.location, tuple(lookup.shards)), lookup)
    return list(lookups.values())


def serve(paths: list[str], host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 8.0,
          max_batch: int = 32) -> None:  # fmt: skip
    """Load everything, listen, print the address (the line a caller waits for) and serve until interrupted."""
    catalogue = load_catalogue(paths)
    app = create_app(catalogue, int(max_upload_mb * 1024 * 1024), Batcher(max_batch))
    # IPPROTO_TCP named, as getaddrinfo would: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it a keep-alive client waits for a delayed ACK (40 ms) on every answer
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # from here connections queue until uvicorn accepts them: the printed address is usable
    except OSError as exc:
        raise ImretError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"imret serve: http://{shown}:{sock.getsockname()[1]}/ ({', '.join(catalogue)})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
