"""A long run's worst day: a rank killed under `torchrun --max-restarts` (the job restarts, resumes and ends with an
uninterrupted run's weights), and a disk that fills while a checkpoint, a model export, an embedding part or a
shard is written (one line with the path and the space free; what was there before stays whole; a rerun after
space is freed completes). The small disk is a tmpfs the test mounts (root only; skipped with the reason elsewhere)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe_overrides
from imret.config import load_recipe
from imret.errors import ImretError
from imret.train import train

TESTS = Path(__file__).parent


def restartable_run(tmp_path, shards, name, kill_on=None):
    """`imret train` on 2 gloo ranks under torchrun --max-restarts 1; when a line of its output contains `kill_on`,
    rank 1 of the first attempt is killed (SIGKILL, by its process id). Returns (exit status, output)."""
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    overrides = tiny_recipe_overrides(shards, tmp_path / "runs", name) + [
        "train.max_epochs=2", "train.steps_per_epoch=6", "checkpoint.every_n_steps=2", "log.every_n_steps=2"]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))  # fmt: skip
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 "--max-restarts", "1", "-m", "imret", "train", str(path),
                                 *[a for o in overrides for a in ("--set", o)]],
                                env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines, killed = [], kill_on is None
    for line in launcher.stderr:
        lines.append(line)
        if not killed and kill_on in line:
            os.kill(worker_of(launcher.pid, rank=1), signal.SIGKILL)
            killed = True
    return launcher.wait(timeout=300), "".join(lines)


def worker_of(launcher: int, rank: int) -> int:
    """The pid of the launcher's worker process of this rank (from the environment torchrun gave it)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environment = handle.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher and f"RANK={rank}".encode() in environment:
            return int(entry)
    raise AssertionError(f"no rank {rank} under {launcher}")


def final_state(run: Path) -> dict:
    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    return torch.load(latest / "state.pt", weights_only=True)["model"]


@pytest.mark.parametrize("kill_on", ["checkpoint", "training"])
def test_a_killed_rank_restarts_the_job_which_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, train_shards, kill_on):
    """Killed after its first checkpoint, the job resumes from it; killed before any (on the line that says training
    starts), it starts again from scratch. Either way the last checkpoint holds an uninterrupted run's weights, and
    no half-written checkpoint or export is left."""
    code, output = restartable_run(tmp_path, train_shards, "straight")
    assert code == 0, output[-3000:]
    code, output = restartable_run(tmp_path, train_shards, "killed", kill_on={"checkpoint": " saved (epoch",
                                                                             "training": "INFO imret.train: training "}[kill_on])  # fmt: skip
    assert code == 0, output[-3000:]
    assert output.count("INFO imret.train: training ") == 2  # the first attempt, and the restarted one
    assert ("resuming from" in output) == (kill_on == "checkpoint")
    straight, killed = final_state(tmp_path / "runs" / "straight"), final_state(tmp_path / "runs" / "killed")
    assert all(torch.equal(straight[key], killed[key]) for key in straight)
    run = tmp_path / "runs" / "killed"
    assert not list((run / "checkpoints").glob(".*")) and not list(run.glob(".model-*"))


@pytest.fixture
def small_disk(tmp_path):
    """A 128 MiB tmpfs (it takes memory only as it fills), mounted for the test and unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small disk for these tests is a tmpfs, and mounting one needs root: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the disk with a ballast file."""
    ballast = disk / "ballast"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(ballast, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(0, free - leave))
    return ballast


def one_line_naming(exc: ImretError, where: str) -> str:
    message = str(exc)
    assert "\n" not in message and where in message and "No space left on device" in message and " free" in message
    return message


def test_a_full_disk_during_a_checkpoint_and_an_export_keeps_the_previous_ones(tmp_path, train_shards, small_disk,
                                                                                monkeypatch):  # fmt: skip
    from imret.tasks import make_task
    from imret.tasks.multilabel import MultilabelTask
    from imret.train import Progress, Terminated, export_model

    path = tmp_path / "recipe.yaml"
    path.write_text("")
    recipe = load_recipe(path, tiny_recipe_overrides(train_shards, small_disk / "runs", "full") + [
        "train.steps_per_epoch=6", "checkpoint.every_n_steps=2"])  # fmt: skip
    original, calls = MultilabelTask.train_loss, {"n": 0}

    def sigterm_on_the_third_step(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the run stops unfinished, its newest checkpoint at step 3
        return original(self, *args)

    monkeypatch.setattr(MultilabelTask, "train_loss", sigterm_on_the_third_step)
    with pytest.raises(Terminated):
        train(recipe)
    monkeypatch.setattr(MultilabelTask, "train_loss", original)
    run = recipe.run_dir
    before = {p.name for p in (run / "checkpoints").iterdir()}
    ballast = fill(small_disk, leave=512 * 1024)
    with pytest.raises(ImretError) as failed:
        train(recipe)  # resumes; its first checkpoint (step 4, mid-epoch) fails
    message = one_line_naming(failed.value, str(run / "checkpoints"))
    assert "MiB to write" in message
    assert {p.name for p in (run / "checkpoints").iterdir()} == before  # no draft left, the newest still whole
    newest = sorted(before)[-1]
    assert torch.load(run / "checkpoints" / newest / "state.pt", weights_only=True)["progress"]["global_step"] == 3

    from imret.data.manifest import load_manifest

    (run / "model").mkdir()
    (run / "model" / "weights.pt").write_bytes(b"an earlier export")
    task = make_task(recipe, [f"c{i}" for i in range(12)])
    metrics = {"loss": 0.1, "threshold": 0.5, "threshold_images": 1.0, "scored_images": 1.0}
    with pytest.raises(ImretError) as failed:
        export_model(task.build_model(), task, recipe, load_manifest(train_shards), metrics, Progress(), run)
    one_line_naming(failed.value, str(run / ".model-tmp"))
    assert (run / "model" / "weights.pt").read_bytes() == b"an earlier export" and not (run / ".model-tmp").exists()

    ballast.unlink()
    (run / "model" / "weights.pt").unlink()
    (run / "model").rmdir()
    finished = train(recipe)
    assert (finished / "checkpoints" / "step-000000012").is_dir() and (finished / "model" / "weights.pt").is_file()


def test_a_full_disk_during_an_embedding_part_keeps_the_finished_parts_and_a_rerun_completes(tmp_path, train_shards, small_disk):
    from imret.embed import embed, load_embeddings

    path = tmp_path / "recipe.yaml"
    path.write_text("")
    run = train(load_recipe(path, tiny_recipe_overrides(train_shards, tmp_path / "runs", "emb") + [
        "train.max_epochs=1", "train.steps_per_epoch=1"]))  # fmt: skip
    out = small_disk / "embeddings"
    ballast = fill(small_disk, leave=64 * 1024)  # room for the first parts (40 x 256 floats each), not all 16
    with pytest.raises(ImretError) as failed:
        embed(str(run), train_shards, "train", out=out, workers=0, batch_size=40)
    one_line_naming(failed.value, str(out / "parts"))
    finished = sorted(p.name for p in (out / "parts").glob("*.npz"))
    assert finished and not list((out / "parts").glob(".*"))  # whole parts only
    ballast.unlink()
    vectors, _, keys, _ = load_embeddings(embed(str(run), train_shards, "train", out=out, workers=0, batch_size=40))
    assert len(vectors) == len(keys) == 640


def test_a_full_disk_during_a_shard_build_names_the_shard_and_a_rerun_completes(synth_dir, small_disk):
    from imret.data.build import build_shards, verify_shards
    from imret.errors import DataError

    out = small_disk / "shards"
    ballast = fill(small_disk, leave=8 * 1024)
    with pytest.raises(DataError) as failed:
        build_shards(synth_dir, "folder", out, samples_per_shard=40, workers=0, retries=0)
    message = one_line_naming(failed.value, "train-000000.tar")
    assert message.startswith("shard train-000000.tar failed (1 try)") and not (out / "manifest.json").exists()
    ballast.unlink()
    build_shards(synth_dir, "folder", out, samples_per_shard=40, workers=0)
    assert verify_shards(out) == []


def test_a_full_disk_under_any_other_write_is_one_line_from_the_command(tmp_path, small_disk, capsys):
    """The command line's net for writes imret does not wrap itself (here the synthetic images PIL saves)."""
    from imret.cli import main

    fill(small_disk, leave=16 * 1024)
    assert main(["data", "synth", str(small_disk / "synth"), "--images", "200", "--size", "96"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("imret: error: ") and "No space left on device" in error
    assert not (small_disk / "synth" / "labels.csv").exists()  # written last: the set is not taken for finished
