"""`imret shards build --engine ray`: the shards built on a Ray cluster, one task a shard, with the local engine's
per-shard writer (imret.data.build.write_shard), so both engines give the same bytes.

`--address` (or RAY_ADDRESS) joins a running cluster; without either, a local Ray instance starts for the build.
A task that fails, or whose node dies, is retried up to `--retries` times by Ray; a shard that still fails stops
the build with one line naming it, and no manifest is written. On a cluster of several machines, the source and the
output must be URLs (s3://...) or a filesystem every node mounts: each node checks that it sees both before any
task runs. Ray's usage statistics are off unless the user turned them on.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from imret.data import storage
from imret.data.build import Encoder, write_shard
from imret.data.plan import ShardPlan
from imret.errors import DataError, ImretError

log = logging.getLogger("imret.data")
CONNECT_TIMEOUT_S = 10.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImretError("--engine ray needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.40')") from None
    return ray


def connect(address: str | None) -> Any:
    """Join the cluster at `address` (RAY_ADDRESS when None), or start a local instance when neither is set. A
    cluster that does not answer is one line at once, not Ray's minutes of retries."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would otherwise report to an outside server
    ray = import_ray()
    if ray.is_initialized():  # a caller (the benchmark) connected already
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise ImretError(f"--address {address}: no Ray cluster answers there ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ImretError(f"--address {address or '(a local Ray instance)'}: {' '.join(str(exc).split())[:300]}") from None
    return ray


def ray_engine(plans: Iterator[ShardPlan], out: str, encoder: Encoder, *, src: str, address: str | None, retries: int,
               on_done: Callable[[dict[str, Any]], None]) -> None:  # fmt: skip
    """Each shard one Ray task (one CPU, spread over the nodes), at most two a CPU of the cluster in flight, so that the
    driver holds a bounded number of plans whatever the dataset's size; done records are handed on as tasks finish."""
    ray = connect(address)
    check_shared(ray, src, out)
    # SPREAD: shards go round the nodes rather than filling the driver's node first, so every machine's disks and
    # network share the reading and writing from the start
    task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=True, scheduling_strategy="SPREAD")(write_shard_on_node)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    in_flight: dict[Any, str] = {}
    for plan in plans:
        in_flight[task.remote(plan, out, encoder)] = plan.name
        while len(in_flight) >= limit:
            _finish_one(ray, in_flight, on_done, retries)
    while in_flight:
        _finish_one(ray, in_flight, on_done, retries)


def _finish_one(ray, in_flight: dict[Any, str], on_done: Callable[[dict[str, Any]], None], retries: int) -> None:
    (ready,), _ = ray.wait(list(in_flight), num_returns=1)
    name = in_flight.pop(ready)
    try:
        on_done(ray.get(ready))
    except ray.exceptions.RayError as exc:
        for pending in in_flight:
            ray.cancel(pending, force=True)
        cause = getattr(exc, "cause", None) or exc
        lines = [line for line in str(cause).splitlines() if line.strip()]
        tries = f"{retries + 1} {'try' if retries == 0 else 'tries'}"
        raise DataError(f"shard {name} failed ({tries}); last error: {lines[-1] if lines else type(cause).__name__}") from None


def write_shard_on_node(plan: ShardPlan, out: str, encoder: Encoder) -> dict[str, Any]:
    """A Ray task: the shard, and which node wrote it (its address and Ray's node id)."""
    import ray

    node = f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"
    return write_shard(plan, out, encoder, node)


def check_shared(ray, src: str, out: str) -> None:
    """On a cluster whose nodes are on more than one machine, every node must see the source and the output: a
    local path there is only right when each machine mounts it. Checked on each node before any task runs."""
    local = [location for location in (src, out) if not storage.is_remote(location)]
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if not local or len({node["NodeManagerAddress"] for node in nodes}) < 2:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    marker = Path(out) / f".imret-visible-{uuid.uuid4().hex[:8]}"
    marker.write_text("")
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0)(_sees)
        answers = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                           .remote(str(Path(src).resolve()) if src in local else None, str(marker.resolve()))
                           for node in nodes])  # fmt: skip
    finally:
        marker.unlink(missing_ok=True)
    blind = [(node["NodeManagerAddress"], missing) for node, missing in zip(nodes, answers) if missing]
    if blind:
        address, missing = blind[0]
        raise ImretError(f"{missing}: not visible on the Ray node at {address}; on a cluster of several machines the "
                         f"source and --out must be URLs (s3://...) or a filesystem every node mounts")  # fmt: skip


def _sees(src: str | None, marker: str) -> str | None:
    """On one node: the first of the source and the output (a marker file in it) that it cannot see, or None."""
    if src is not None and not os.path.isdir(src):
        return src
    return None if os.path.exists(marker) else str(Path(marker).parent)
