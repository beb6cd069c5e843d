"""`imret bench serve`: queries/s and latency of `imret serve` under 1, 8 and 32 concurrent clients.

Everything is real except the gallery's vectors: the server runs in a subprocess over an index directory
whose model is a small CNN (64 px) trained for a step, whose shards hold `gallery` tiny JPEGs built by
`imret shards build`, and whose embeddings are random vectors of the model's dimension written through the
embedding job's own part and merge code (a search costs the same whatever the vectors hold; embedding 100k
images would only make the benchmark slow). Each client is a thread with its own keep-alive connection that
posts real JPEG scenes (96 px, as `imret data synth` draws them) to /search with k=5, one after another, for
`seconds`. The baseline is the same server answering one query at a time (`--max-batch 1`), up at the same
time and measured in turns with it at each number of clients.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from datetime import date
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import numpy as np

from imret.bench import _recipe, _synth_shards, machine
from imret.errors import ImretError


def form_data(image: bytes, filename: str = "query.jpg", **fields: Any) -> tuple[bytes, str]:
    """A multipart/form-data body with one image part and plain fields, and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]  # fmt: skip
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")  # fmt: skip
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@contextmanager
def running_server(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`imret serve ARGS --port 0` in a subprocess: yields its base URL once /healthz answers, and stops it.
    Its output goes to `log` (read it when something fails). The server prints its address once it listens, so
    the first request waits in the listen queue instead of being refused: nothing polls."""
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "imret", "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            url = None
            for line in process.stdout:  # the address is printed once everything is loaded and the port is bound
                out.write(line)
                if line.startswith(b"imret serve: http://"):
                    url = line.split()[2].decode().rstrip("/")
                    break
            if url is None:
                raise ImretError(f"imret serve exited with status {process.wait()} before listening: see {log}")
            drainer = threading.Thread(target=drain, args=(process.stdout, out), daemon=True)
            drainer.start()
            status = request(url, "GET", "/healthz")[0]
            if status != 200:
                raise ImretError(f"imret serve answered /healthz with {status}: see {log}")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if url is not None:
                drainer.join()


def drain(stream, out) -> None:
    for line in stream:
        out.write(line)
        out.flush()


def connect(url: str) -> http.client.HTTPConnection:
    """A connection that sends at once: http.client writes a request's headers and a body of more than a few
    KB in two sends, which Nagle's algorithm holds back until the server's delayed ACK (40 ms a request)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """(status, headers, body). A server that answers before reading the whole body (a 413) may close the
    connection under the client's feet: the send error is ignored and the answer read, as httpx does."""
    conn = connection or connect(url)
    try:
        conn.putrequest(method, path)
        for name, value in {**(headers or {}), "Content-Length": str(len(body or b""))}.items():
            conn.putheader(name, value)
        try:
            conn.endheaders(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if connection is None:
            conn.close()


def measure(url: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads post queries back to back for `seconds`: queries/s and latency percentiles."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        try:
            conn = connect(url)
            start.wait()
        except (OSError, threading.BrokenBarrierError) as exc:
            failures.append(f"connecting: {exc}")
            start.abort()  # nobody waits for a client that will not come
            return
        n = i
        while time.perf_counter() < stop_at[0]:
            body, content_type = bodies[n % len(bodies)]
            n += clients
            began = time.perf_counter()
            status, _, answer = request(url, "POST", "/search", body, {"Content-Type": content_type}, conn)
            if status != 200:
                failures.append(f"{status}: {answer[:200]!r}")
                return
            latencies[i].append(time.perf_counter() - began)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass  # a client could not connect: said below
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if failures:
        raise ImretError(f"imret bench serve: a query failed: {failures[0]}")
    times = np.concatenate([np.asarray(t) for t in latencies]) * 1000
    return {"clients": clients, "queries": len(times), "queries_per_s": round(len(times) / elapsed, 1),
            "p50_ms": round(float(np.percentile(times, 50)), 1), "p99_ms": round(float(np.percentile(times, 99)), 1)}  # fmt: skip


def bench_index(tmp: Path, gallery: int) -> Path:
    """A real index directory: a small CNN trained for a step, `gallery` tiny JPEGs in shards, random vectors."""
    import torch
    from PIL import Image

    from imret.data.build import build_shards
    from imret.data.lookup import scan_shard
    from imret.data.manifest import load_manifest
    from imret.embed import Part, job_fingerprint, load_model, merge_parts, write_part
    from imret.index import build_and_save
    from imret.train import train

    _, model_shards = _synth_shards(tmp / "model", images=160, workers=1)
    run = train(_recipe(tmp / "model", model_shards, 64, 1, ["train.steps_per_epoch=1"]))
    source, rng = tmp / "gallery-source", np.random.default_rng(0)
    (source / "images").mkdir(parents=True)
    classes = ["shirt", "dress", "trousers", "hat", "bag", "shoes"]
    (source / "classes.txt").write_text("\n".join(classes) + "\n")
    rows = ["image,labels"]
    total = round(gallery / 0.99)  # 1% goes to the val split, which the page's examples come from
    for i in range(total):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(source / "images" / f"g{i:07d}.jpg")
        rows.append(f"g{i:07d}.jpg,{';'.join(rng.choice(classes, size=rng.integers(1, 4), replace=False))}")
    (source / "labels.csv").write_text("\n".join(rows) + "\n")
    shards = tmp / "gallery"
    build_shards(source, "folder", shards, val_fraction=0.01, samples_per_shard=10_000, workers=2)
    manifest = load_manifest(shards)
    keys = [sample[0] for s in manifest["splits"]["train"]["shards"] for sample in scan_shard(str(shards), s["file"])]
    _, meta = load_model(str(run))
    dim = meta["embedding"]["dim"]
    out = tmp / "index"
    (out / "parts").mkdir(parents=True)
    labels = (rng.random((len(keys), len(classes))) < 0.3).astype(np.uint8)
    vectors = rng.normal(size=(len(keys), dim)).astype(np.float32)
    write_part(out / "parts" / "all.npz", Part(keys, [labels], [torch.from_numpy(vectors)]), dim, len(classes))
    job = job_fingerprint(str(run), meta, None, None, manifest, "train", "cpu")
    merge_parts(out, [out / "parts" / "all.npz"], meta, job, manifest, "train", str(shards))
    build_and_save(out, device="cpu")
    return out


def query_bodies(tmp: Path, count: int) -> list[tuple[bytes, str]]:
    from imret.data.synth import write_synth

    data = write_synth(tmp / "queries", images=count, size=96, seed=1)
    return [form_data(path.read_bytes(), path.name, k=5) for path in sorted((data / "images").iterdir())]


def run_serve_bench(gallery: int = 100_000, clients: tuple[int, ...] = (1, 8, 32), seconds: float = 8.0,
                    queries: int = 64) -> dict[str, Any]:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        index = bench_index(tmp, gallery)
        setup_seconds = time.perf_counter() - start
        bodies = query_bodies(tmp, queries)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        modes = {"batched": 32, "one_at_a_time": 1}
        results: dict[str, dict[str, Any]] = {mode: {} for mode in modes}
        with ExitStack() as stack:  # both up at once, measured in turns: the machine's other load hits both alike
            urls = {mode: stack.enter_context(running_server([str(index), "--max-batch", str(max_batch)],
                                                             tmp / f"{mode}.log", env))
                    for mode, max_batch in modes.items()}  # fmt: skip
            for url in urls.values():
                measure(url, bodies, 2, min(seconds, 2.0))  # warm-up: first forward passes, page cache
            for clients_now in clients:
                for mode, url in urls.items():
                    results[mode][str(clients_now)] = measure(url, bodies, clients_now, seconds)
            for mode, url in urls.items():
                results[mode]["batch_sizes"] = request_json(url, "/healthz")["batch_sizes"]
        count = len(np.load(index / "labels.npy", mmap_mode="r"))
    speedup = {str(c): round(results["batched"][str(c)]["queries_per_s"] / results["one_at_a_time"][str(c)]["queries_per_s"], 2)
               for c in clients}  # fmt: skip
    return {"bench": "serve", "date": date.today().isoformat(), "machine": machine(), "gallery": count,
            "index": "flat (exact)", "model": "small-cnn, 64 px", "k": 5, "seconds_per_level": seconds,
            "setup_seconds": round(setup_seconds, 1), "batched": results["batched"],
            "one_at_a_time": results["one_at_a_time"], "speedup_batched_vs_one_at_a_time": speedup}  # fmt: skip


def request_json(url: str, path: str) -> dict[str, Any]:
    status, _, body = request(url, "GET", path)
    if status != 200:
        raise ImretError(f"{url}{path}: HTTP {status}")
    return json.loads(body)
