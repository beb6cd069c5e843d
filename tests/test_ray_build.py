"""`imret shards build --engine ray` on a real two-node Ray cluster on 127.0.0.1 (tests/ray_cluster.py): the same
shards and manifest as the local engine, into a directory and into the S3 bucket, with tasks on both nodes; a
killed driver resumed by a rerun that builds only what is missing; a killed worker node survived; a bad address
in one line. The builds run as `imret` commands, the driver in its own process as a user runs it."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from imret.data.build import build_shards
from imret.data.synth import write_synth
from ray_cluster import TwoNodeCluster, ray_env

pytest.importorskip("ray")
PER_SHARD = "40"  # a shard takes long enough (about 0.1 s) that Ray does not keep reusing one node's worker


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """480 small scenes (10 train and 2 val shards), one of them a truncated JPEG: a reject, not a failed task."""
    data = write_synth(tmp_path_factory.mktemp("ray-src") / "data", images=480, size=48, seed=11)
    broken = data / "images" / "synth-000007.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    return data


@pytest.fixture(scope="module")
def local_build(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-local") / "shards"
    build_shards(source, "folder", out, samples_per_shard=int(PER_SHARD), workers=0)
    return out


@pytest.fixture(scope="module")
def cluster(s3):
    """Started after the S3 service, so both nodes have its credentials in their environment, as a real cluster's
    machines have theirs."""
    cluster = TwoNodeCluster().start()
    yield cluster
    cluster.stop()


def build_command(source, out, *extra):
    return [sys.executable, "-m", "imret", "shards", "build", str(source), "--format", "folder", "--out", str(out),
            "--samples-per-shard", PER_SHARD, "--engine", "ray", *extra]  # fmt: skip


def shards_of(directory):
    return {p.name: p.read_bytes() for p in directory.glob("*.tar")}


def manifest_without_date(location_text):
    manifest = json.loads(location_text)
    manifest.pop("created")
    return manifest


def done_records(directory):
    return {p.name: json.loads(p.read_text()) for p in directory.glob(".*.done.json")}


def test_ray_writes_the_local_engines_shards_byte_for_byte_with_tasks_on_both_nodes(cluster, source, local_build, tmp_path):
    out = tmp_path / "shards"
    result = subprocess.run(build_command(source, out, "--address", cluster.address), env=ray_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert shards_of(out) == shards_of(local_build)
    ours = manifest_without_date((out / "manifest.json").read_text())
    assert ours == manifest_without_date((local_build / "manifest.json").read_text())
    assert [r["reason"] for r in ours["rejected"]] == ["cannot decode image: Truncated File Read"]
    nodes = {record["node"] for record in done_records(out).values()}
    assert len(nodes) == 2 and all(node.startswith("127.0.0.1 (") for node in nodes)  # both nodes wrote shards
    assert "node 127.0.0.1 (" in result.stderr  # the per-node summary
    again = subprocess.run(build_command(source, out, "--address", cluster.address), env=ray_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0 and "nothing to do" in again.stderr  # a finished build of the same inputs


def test_ray_builds_into_the_bucket_what_it_builds_into_a_directory(cluster, source, local_build, s3):
    import s3fs

    url = f"{s3}/ray-build"
    result = subprocess.run(build_command(source, url, "--address", cluster.address), env=ray_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    fs = s3fs.S3FileSystem()
    for name, payload in shards_of(local_build).items():
        assert fs.cat_file(f"{url}/{name}") == payload, name
    remote = manifest_without_date(fs.cat_file(f"{url}/manifest.json").decode())
    assert remote == manifest_without_date((local_build / "manifest.json").read_text())


def test_a_killed_driver_is_resumed_by_a_rerun_that_builds_only_the_missing_shards(cluster, source, local_build, tmp_path):
    out = tmp_path / "shards"
    driver = subprocess.Popen(build_command(source, out, "--address", cluster.address), env=ray_env(),
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    finished = 0
    for line in driver.stderr:
        finished += " samples, " in line and line.startswith("INFO imret.data: shard ")
        if finished == 3:
            driver.send_signal(signal.SIGKILL)
            break
    driver.wait()
    assert not (out / "manifest.json").exists()
    before = {name: (out / record["file"]).stat().st_mtime_ns for name, record in done_records(out).items()}
    assert 3 <= len(before) < len(shards_of(local_build))
    result = subprocess.run(build_command(source, out, "--address", cluster.address), env=ray_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name, stamp in before.items():  # finished shards were kept, not rewritten
        assert (out / done_records(out)[name]["file"]).stat().st_mtime_ns == stamp
    assert shards_of(out) == shards_of(local_build) and not list(out.glob(".*.tmp"))
    # the killed driver's last tasks may still finish a shard before the rerun lists the folder: kept, not rebuilt
    kept = int(re.search(r": (\d+) of \d+ shards were finished by an earlier run and kept", result.stderr).group(1))
    built_now = result.stderr.count("INFO imret.data: shard ")
    assert kept >= len(before) and built_now == len(shards_of(local_build)) - kept


def test_a_bad_address_is_one_line(source, tmp_path):
    result = subprocess.run(build_command(source, tmp_path / "out", "--address", "127.0.0.1:1"), env=ray_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == ["imret: error: --address 127.0.0.1:1: no Ray cluster answers there "
                                                "(Connection refused)"]  # fmt: skip


def test_a_killed_worker_node_leaves_the_build_complete_with_every_sample_once(cluster, source, local_build, tmp_path):
    """Last in the module: the cluster keeps one node after it."""
    out = tmp_path / "shards"
    driver = subprocess.Popen(build_command(source, out, "--address", cluster.address, "--retries", "2"),
                              env=ray_env(), stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines = []
    for line in driver.stderr:
        lines.append(line)
        if line.startswith("INFO imret.data: shard ") and " samples, " in line:
            os.kill(cluster.worker.raylet(), signal.SIGKILL)
            break
    lines += driver.stderr.readlines()
    assert driver.wait(timeout=300) == 0, "".join(lines[-40:])
    assert shards_of(out) == shards_of(local_build)  # every sample once: the same shards, each whole
    assert not list(out.glob(".*.tmp"))
