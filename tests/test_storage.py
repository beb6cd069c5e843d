"""Shards at a URL: built into, verified in, trained and embedded from a real S3 service (SeaweedFS, started by
the `s3` fixture) and a plain HTTP server, equal to the same build on local disk; every failure one line; and
two "machines" (two torchrun launches, each in its own empty directory) that share nothing but the bucket."""

from __future__ import annotations

import http.client
import http.server
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import s3fs

from conftest import tiny_recipe_overrides
from imret.cli import main
from imret.data import storage
from imret.data.manifest import load_manifest
from imret.data.shards import make_loader
from imret.errors import ImretError

BUILD = ["--format", "folder", "--val-fraction", "0.25", "--samples-per-shard", "10", "--workers", "0"]  # synth_shards'
TORCH_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}  # fmt: skip


@pytest.fixture(scope="module")
def remote_build(s3, synth_dir) -> str:
    """synth_dir built into the bucket with synth_shards' settings, through the CLI."""
    url = f"{s3}/synth"
    assert main(["shards", "build", str(synth_dir), "--out", url, *BUILD]) == 0
    return url


def bucket() -> s3fs.S3FileSystem:
    """A client of our own, for arranging objects and for looking at them."""
    return s3fs.S3FileSystem(skip_instance_cache=True)


def error_line(stderr: str) -> str:
    """The CLI's error, which must be exactly one line (a progress bar may precede it on that line)."""
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = re.findall(r"imret: error: [^\r\n]*", stderr)
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def batches(location, split: str) -> list[tuple[list[str], bytes]]:
    return [(batch["key"], batch["image"].numpy().tobytes())
            for batch in make_loader(location, split, batch_size=8, size=32, training=False)]  # fmt: skip


# ---------------------------------------------------------------- building, verifying, reading


def test_a_build_to_s3_is_the_local_build_and_reads_the_same(remote_build, synth_shards, capsys):
    local = load_manifest(synth_shards)
    assert load_manifest(remote_build)["splits"] == local["splits"]  # the same shards, byte for byte
    assert storage.listdir(remote_build) == sorted(p.name for p in synth_shards.iterdir())  # nothing else, no temps
    assert main(["shards", "verify", remote_build]) == 0
    assert main(["shards", "info", remote_build]) == 0
    printed = capsys.readouterr().out
    assert f"{remote_build}: ok" in printed and "train: 90 samples in 9 shards" in printed
    for split in ("train", "val"):
        assert batches(remote_build, split) == batches(synth_shards, split)


def test_a_finished_remote_build_is_replaced_only_with_overwrite_and_only_our_files_go(s3, synth_dir, capsys):
    url = f"{s3}/again"
    build = ["shards", "build", str(synth_dir), "--format", "folder", "--out", url, "--workers", "0"]
    assert main([*build, "--samples-per-shard", "50"]) == 0
    fs = bucket()
    fs.pipe(f"{url}/train-000099.tar", b"an earlier build's shard")
    fs.pipe(f"{url}/notes.txt", b"the user's")
    capsys.readouterr()
    assert main([*build, "--samples-per-shard", "50"]) == 0  # the same inputs: nothing to do
    assert main(build) == 2  # other inputs (shards of 1000)
    assert error_line(capsys.readouterr().err) == (f"imret: error: {url} holds a finished build (of other inputs, or an "
                                                   f"older imret's): pass --overwrite to replace it")  # fmt: skip
    assert main([*build, "--overwrite"]) == 0
    assert storage.listdir(url) == [".train-000000.tar.done.json", ".val-000000.tar.done.json", "manifest.json",
                                    "notes.txt", "train-000000.tar", "val-000000.tar"]  # fmt: skip
    assert main(["shards", "verify", url]) == 0


def test_shards_published_without_their_manifest_are_not_a_finished_build(s3, synth_dir, tmp_path, capsys):
    """What a build killed mid-upload leaves: shards, and no manifest (here a --strict build stops before it)."""
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    (data / "images" / "synth-000007.jpg").write_bytes(b"")
    url = f"{s3}/stopped"
    assert main(["shards", "build", str(data), "--out", url, "--strict", *BUILD]) == 2
    assert "--strict: 1 rejected" in error_line(capsys.readouterr().err)
    published = storage.listdir(url)
    assert "train-000000.tar" in published and "manifest.json" not in published
    assert main(["shards", "verify", url]) == 2
    assert error_line(capsys.readouterr().err) == (f"imret: error: {url}: no manifest.json, so not a finished shard build "
                                                   f"(an unfinished or killed build: run `imret shards build` again)")  # fmt: skip


@pytest.fixture(scope="module")
def http_build(synth_shards) -> Iterator[str]:
    """synth_shards served over plain HTTP."""
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(synth_shards.parent))  # noqa: E731
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/{synth_shards.name}"


@contextmanager
def serving(server: http.server.ThreadingHTTPServer):
    server.RequestHandlerClass.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_shards_over_https_read_as_local_ones(http_build, synth_shards):
    assert main(["shards", "verify", http_build]) == 0
    assert batches(http_build, "val") == batches(synth_shards, "val")


# ---------------------------------------------------------------- failures: one line each, retries bounded


def flip_a_byte_in_an_image(url: str) -> None:
    """Inside the first image's data: the tar still parses and the sample may even decode; only the checksum knows."""
    fs = bucket()
    data = bytearray(fs.cat(url))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data[member.offset_data + member.size // 2] ^= 0x01
    fs.pipe(url, bytes(data))


@pytest.fixture(scope="module")
def damaged_build(remote_build) -> str:
    url = remote_build.replace("/synth", "/damaged")
    fs = bucket()
    fs.copy(f"{remote_build}/", f"{url}/", recursive=True)
    flip_a_byte_in_an_image(f"{url}/train-000001.tar")
    fs.rm(f"{url}/val-000002.tar")
    return url


def test_a_flipped_byte_and_a_missing_shard_are_each_named_by_verify(damaged_build, capsys):
    assert main(["shards", "verify", damaged_build]) == 1
    printed = capsys.readouterr().out
    assert "MISMATCH train-000001.tar: sha256 differs from the manifest" in printed
    assert "MISMATCH val-000002.tar: missing" in printed and "2 shard(s) differ" in printed


def test_a_flipped_byte_and_a_missing_shard_stop_a_job_with_one_line(damaged_build, trained, tmp_path):
    """Through the CLI, with loader workers: the shard's checksum is compared when it has streamed through."""
    command = [sys.executable, "-m", "imret", "embed", str(trained), "--shards", damaged_build, "--workers", "2"]
    env = dict(os.environ, **TORCH_ENV)
    flipped = subprocess.run([*command, "--split", "train", "--out", str(tmp_path / "train")], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert flipped.returncode == 2
    assert error_line(flipped.stderr) == (f"imret: error: shard {damaged_build}/train-000001.tar: sha256 differs from "
                                          f"the manifest")  # fmt: skip
    missing = subprocess.run([*command, "--split", "val", "--out", str(tmp_path / "val")], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert missing.returncode == 2
    assert error_line(missing.stderr) == f"imret: error: {damaged_build}/val-000002.tar: not found"


def test_credentials_endpoint_and_package_errors_are_one_line(remote_build, monkeypatch, capsys):
    def info_error() -> str:
        assert main(["shards", "info", remote_build]) == 2
        return error_line(capsys.readouterr().err)

    manifest = f"{remote_build}/manifest.json"
    with monkeypatch.context() as env:
        env.delenv("AWS_ACCESS_KEY_ID")
        env.delenv("AWS_SECRET_ACCESS_KEY")
        assert info_error() == (f"imret: error: {manifest}: no credentials: set AWS_ACCESS_KEY_ID and "
                                f"AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a store other than AWS)")  # fmt: skip
    with monkeypatch.context() as env:
        env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        assert re.fullmatch(rf"imret: error: {manifest}: access denied \(.*\): check AWS_ACCESS_KEY_ID .*", info_error())
    with monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
        env.setattr(storage, "BACKOFF_S", 0.01)
        assert re.fullmatch(rf"imret: error: {manifest}: EndpointConnectionError: Could not connect to the endpoint URL: "
                            rf".* \(gave up after 5 tries\)", info_error())  # fmt: skip
    assert main(["shards", "info", "s3://imret-test/nothing-here"]) == 2
    assert error_line(capsys.readouterr().err).endswith("no manifest.json, so not a finished shard build")
    assert main(["shards", "info", "gs://a-bucket/shards"]) == 2  # gcsfs is not installed here
    assert error_line(capsys.readouterr().err) == ("imret: error: gs://a-bucket/shards/manifest.json: reading gs:// "
                                                   "locations needs gcsfs: pip install gcsfs")  # fmt: skip


def test_run_directories_and_embeddings_stay_local(tmp_path, synth_shards):
    from imret.config import load_recipe
    from imret.embed import embed

    path = tmp_path / "recipe.yaml"
    path.write_text("")
    with pytest.raises(ImretError, match="run.dir s3://b/runs: run directories and checkpoints stay on a local or shared disk"):
        load_recipe(path, [f"data.shards={synth_shards}", "run.dir=s3://b/runs"])
    with pytest.raises(ImretError, match="--out s3://b/emb: run directories, checkpoints and embeddings stay on a local"):
        embed("imagenet-resnet18", synth_shards, "val", out="s3://b/emb")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Between the client and the S3 service: forwards every request and records it; the first GET of each
    object answers 503, the second breaks its connection half-way through the body."""

    upstream: tuple[str, int]
    seen: list[tuple[str, str, dict[str, str]]]
    gets: dict[str, int]
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        count = self.gets[self.path.split("?")[0]] = self.gets.get(self.path.split("?")[0], 0) + 1
        self.forward(fail=count if self.path.split("?")[0].endswith(".tar") else 0)

    def do_HEAD(self) -> None:  # noqa: N802
        self.forward()

    def do_PUT(self) -> None:  # noqa: N802
        self.forward()

    def forward(self, fail: int = 0) -> None:
        self.seen.append((self.command, self.path, dict(self.headers)))
        if fail == 1:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        connection.request(self.command, self.path, body=body, headers=dict(self.headers))
        answer = connection.getresponse()
        payload = answer.read()
        connection.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection"):
                self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if fail == 2 and len(payload) > 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # a reset mid-body
            return
        self.wfile.write(payload)


@pytest.fixture
def flaky(s3, monkeypatch) -> Iterator[type[FlakyProxy]]:
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    handler = type("Proxy", (FlakyProxy,), {"upstream": (endpoint[0], int(endpoint[1])), "seen": [], "gets": {}})
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
        yield handler


def test_transient_failures_are_retried_and_refusals_are_not(remote_build, synth_shards, flaky, monkeypatch, caplog):
    monkeypatch.setattr(storage, "BLOCK", 4096)  # many ranged reads per shard: a reset lands mid-shard
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # botocore reads only AWS_DEFAULT_REGION: imret passes this one on
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert batches(remote_build, "val") == batches(synth_shards, "val")
    shards = [path for path in flaky.gets if path.endswith(".tar")]
    assert len(shards) == 3 and all(flaky.gets[path] > 2 for path in shards)  # 503, reset, then the rest
    assert "Service Unavailable; trying again" in caplog.text and "payload is not completed" in caplog.text
    assert all("/eu-west-1/s3/aws4_request" in headers["Authorization"] for _, _, headers in flaky.seen)

    flaky.seen.clear()
    with pytest.raises(ImretError, match="val-000009.tar: not found"):
        storage.Reader(f"{remote_build}/val-000009.tar")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ImretError, match="access denied"):
        storage.Reader(f"{remote_build}/val-000000.tar")
    requests = [(method, path) for method, path, _ in flaky.seen]
    assert requests and len(requests) == len(set(requests))  # none asked twice: a 404 or a 403 is never retried


# ---------------------------------------------------------------- training and embedding from the bucket alone


def recipe_args(tmp_path: Path, shards: str, name: str) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    overrides = tiny_recipe_overrides(shards, "runs", name) + ["data.batch_size_per_device=8", "train.max_epochs=1"]
    return [str(path), *[a for o in overrides for a in ("--set", o)]]


def agreement(stderr: str) -> str:
    found = re.search(r"2 ranks agree: (\d+ steps each, weights checksum \w+)", stderr)
    assert found, stderr[-3000:]
    return found.group(1)


@pytest.fixture(scope="module")
def local_two_ranks(synth_shards, tmp_path_factory) -> tuple[Path, str]:
    """Two gloo ranks, one launch, trained on the local build: the run, and what the ranks agreed on."""
    work = tmp_path_factory.mktemp("local-ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "imret",
               "train", *recipe_args(work, str(synth_shards), "ddp")]  # fmt: skip
    result = subprocess.run(command, cwd=work, env=dict(os.environ, **TORCH_ENV), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "runs" / "ddp", agreement(result.stderr)


@pytest.fixture(scope="module")
def trained(local_two_ranks) -> Path:
    return local_two_ranks[0]


def test_two_ranks_train_from_s3_as_from_the_local_copy(remote_build, local_two_ranks, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "imret",
               "train", *recipe_args(tmp_path, remote_build, "ddp")]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, **TORCH_ENV), capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert agreement(result.stderr) == local_two_ranks[1]  # the same steps to the same weights
    assert agreement(result.stderr).startswith("5 steps each")  # 50 and 40 samples on the ranks, batches of 8


def two_machines(tmp_path: Path, *args: str) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2` started twice at once, as on two machines: each node in its own directory, which is
    all it writes to; what they share is the rendezvous port and the bucket."""
    port = closed_port()
    nodes = []
    for rank in range(2):
        node = tmp_path / f"node{rank}"
        node.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", "imret-test", "-m", "imret", *args]  # fmt: skip
        nodes.append(subprocess.Popen(command, cwd=node, env=dict(os.environ, **TORCH_ENV), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = []
    for process in nodes:
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def succeeded(results: list[subprocess.CompletedProcess]) -> str:
    """Both nodes' stderr, once both exited 0."""
    stderr = "".join(r.stderr for r in results)
    assert [r.returncode for r in results] == [0, 0], stderr[-6000:]
    return stderr


def rank_zero_node(tmp_path: Path, inside: str) -> tuple[Path, Path]:
    """(rank 0's node directory, the other one): rendezvous, not --node_rank, decides which is which."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    holders = [node for node in nodes if (node / inside).exists()]
    assert len(holders) == 1, holders
    return holders[0], next(node for node in nodes if node != holders[0])


def test_two_machines_without_a_shared_disk_train_and_embed_from_s3(remote_build, local_two_ranks, synth_shards,
                                                                    tmp_path):  # fmt: skip
    from imret.embed import embed, load_embeddings

    args = recipe_args(tmp_path, remote_build, "ddp")
    assert agreement(succeeded(two_machines(tmp_path, "train", *args))) == local_two_ranks[1]
    first, other = rank_zero_node(tmp_path, "runs/ddp/model")
    assert not list((other / "runs" / "ddp" / "checkpoints").iterdir())  # rank 1's RNG files never joined one
    again = two_machines(tmp_path, "train", *args)  # one node sees the finished run's checkpoint, the other none
    assert all(r.returncode != 0 for r in again)
    assert "resuming needs the run directory on a filesystem every machine shares" in again[0].stderr + again[1].stderr

    for node in (first, other):  # the model travels to each machine; the shards stay in the bucket
        shutil.copytree(local_two_ranks[0] / "model", node / "model-run" / "model")
    succeeded(two_machines(tmp_path, "embed", "model-run", "--shards", remote_build, "--split", "train", "--out", "emb",
                           "--workers", "1"))  # fmt: skip
    merged, elsewhere = rank_zero_node(tmp_path, "emb/meta.json")
    assert len(list((elsewhere / "emb" / "parts").glob("*.npz"))) == 4  # rank 1's shards: 1, 3, 5, 7, sent to rank 0
    vectors, labels, keys, _ = load_embeddings(merged / "emb")
    single = load_embeddings(embed(str(local_two_ranks[0]), synth_shards, "train", out=tmp_path / "single", workers=0))
    assert list(keys) == list(single[2]) and len(keys) == 90
    assert np.array_equal(labels, single[1]) and np.allclose(vectors, single[0], atol=1e-6)
