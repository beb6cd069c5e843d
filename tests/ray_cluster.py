"""A real two-node Ray cluster for the tests: a head node and a second node, each its own `ray start --block`
process limited to one CPU, every address on 127.0.0.1, stopped by their process ids (never `ray stop`, which
stops every Ray process on the host).

Ray turns 127.0.0.1 into the host's outward address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that
setting `ray start --address` refuses to join ("multi-node clusters are not supported on Windows and OSX"). So
every Ray process and driver gets the setting, and the nodes start through a launcher that keeps the address
as given (`resolve_ip_for_localhost`) and allows the join (`ENABLE_RAY_CLUSTER`): two private names of Ray 2.60
(the dev extra pins it). Token authentication off (RAY_AUTH_MODE=disabled: with a token file in ~/.ray a head
would turn it on and the second node could not join), usage statistics off, node death noticed in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
LAUNCHER = """import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # fmt: skip
HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 500,
          "health_check_failure_threshold": 3}  # fmt: skip


def ray_env(**extra: str) -> dict[str, str]:
    """This process's environment with the cluster's settings: for the nodes and for a driver."""
    return {**os.environ, **ENV, **extra}


@dataclass
class Node:
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)

    def raylet(self) -> int:
        """The node's raylet: the child of its `ray start` named raylet."""
        for pid in children(self.process.pid):
            with open(f"/proc/{pid}/comm") as handle:
                if handle.read().strip() == "raylet":
                    return pid
        raise RuntimeError(f"no raylet under ray start {self.process.pid}:\n{''.join(self.output[-20:])}")


class TwoNodeCluster:
    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")  # unix socket paths stay under 107 bytes
        self.nodes: list[Node] = []
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            self.port = probe.getsockname()[1]
        self.address = f"{LOOPBACK}:{self.port}"

    def start(self) -> TwoNodeCluster:
        common = ["start", "--block", "--node-ip-address", LOOPBACK, "--num-cpus", "1", "--num-gpus", "0",
                  "--object-store-memory", "100000000", "--disable-usage-stats", "--log-style", "record"]  # fmt: skip
        try:
            self._node(common + ["--head", "--port", str(self.port), "--include-dashboard=false", "--no-monitor",
                                 "--temp-dir", self.temp, "--system-config", json.dumps(HEALTH)])  # fmt: skip
            self._node(common + ["--address", self.address])
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, args: list[str]) -> None:
        """Start a node and wait for the line that says it runs (read from its output: no polling)."""
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ray_env(),
                                   cwd=self.temp, start_new_session=True)  # fmt: skip
        node = Node(process)
        self.nodes.append(node)
        started = threading.Event()

        def drain() -> None:  # keeps reading, so the node never blocks on a full pipe
            for line in process.stdout:
                node.output.append(line)
                if "Ray runtime started." in line:
                    started.set()
            started.set()

        threading.Thread(target=drain, daemon=True).start()
        if not started.wait(90) or process.poll() is not None:
            raise RuntimeError(f"ray start {args[-1]} did not start:\n{''.join(node.output[-30:])}")

    @property
    def worker(self) -> Node:
        return self.nodes[1]

    def stop(self) -> None:
        """SIGTERM each `ray start` (second node first), which stops its node's processes; anything left in its
        session after that is killed. Only this cluster's processes are touched."""
        for node in reversed(self.nodes):
            session = node.process.pid
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
                try:
                    node.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
            for pid in session_members(session):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.nodes = []
        shutil.rmtree(self.temp, ignore_errors=True)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def session_members(session: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    members.append(int(entry))
            except OSError:
                continue
    return members
