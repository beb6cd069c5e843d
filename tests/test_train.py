"""The trainer on tiny synthetic shards, CPU only: every task learns, resume is exact, signals and failures
are handled, and two gloo ranks agree."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe_overrides
from imret.cli import main
from imret.config import load_recipe
from imret.errors import ImretError
from imret.train import Terminated, TrainingError, train

RECIPES = sorted(p for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml") if not p.name.startswith("study"))


def recipe(tmp_path, shards, name="t", extra=()):
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    return load_recipe(path, tiny_recipe_overrides(shards, tmp_path / "runs", name) + list(extra))


def records(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


TASKS = {
    "multilabel": ([], "f1"),
    # triplet: the held-out objective improves in two tiny epochs; retrieval itself takes longer (see README)
    "triplet": (["task.name=triplet", "task.mining=semi_hard", "task.margin_start=0.2", "task.margin_end=0.2"], None),
    "rotation": (["task.name=rotation"], "accuracy"),
    "segmentation": (["task.name=segmentation", "model.backbone=resnet18", "data.batch_size_per_device=16"], "iou"),
}


@pytest.mark.parametrize("task", TASKS)
def test_each_task_beats_its_untrained_start(tmp_path, train_shards, task):
    extra, metric = TASKS[task]
    run_dir = train(recipe(tmp_path, train_shards, task, extra))
    val = records(run_dir, "val")
    assert val[0]["step"] == 0 and len(val) == 3  # the untrained model, then two epochs
    assert min(r["loss"] for r in val[1:]) < val[0]["loss"]
    if metric:
        assert max(r[metric] for r in val[1:]) > val[0][metric]
    meta = json.loads((run_dir / "model" / "meta.json").read_text())
    assert meta["task"] == task and val[-1].keys() - {"epoch", "step", "split"} == meta["val"].keys()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "plots" / "loss.png").is_file()
    state = torch.load(run_dir / "model" / "weights.pt", weights_only=True)
    assert state and all(torch.isfinite(v.float()).all() for v in state.values())
    if task in ("segmentation", "multilabel"):  # example predictions
        assert (run_dir / "plots" / "val-examples.png").is_file()


def test_meta_declares_each_models_embedding_layer(tmp_path, train_shards):
    classifier = train(recipe(tmp_path, train_shards, "cls", ["train.max_epochs=1"]))
    meta = json.loads((classifier / "model" / "meta.json").read_text())
    assert meta["embedding"] == {"layer": "pooled", "dim": 256} and meta["initialisation"] == "scratch (Kaiming)"
    assert 0 < meta["threshold"] < 1 and meta["classes"][0] == "shirt"

    triplet = train(recipe(tmp_path, train_shards, "tri", ["train.max_epochs=1", "task.name=triplet",
                                                           "model.init=run", f"model.weights={classifier}"]))
    meta = json.loads((triplet / "model" / "meta.json").read_text())
    assert meta["embedding"] == {"layer": "head", "dim": 128}
    assert meta["initialisation"].startswith(f"run {classifier} (multilabel")


def test_imagenet_weights_from_a_local_file_and_a_clear_offline_error(tmp_path, train_shards, monkeypatch):
    from torchvision.models import resnet18

    weights = tmp_path / "resnet18-local.pth"
    reference = resnet18().state_dict()
    torch.save(reference, weights)
    run_dir = train(recipe(tmp_path, train_shards, "ft", ["model.backbone=resnet18", "model.init=imagenet",
                                                          f"model.weights={weights}", "train.max_epochs=1",
                                                          "train.steps_per_epoch=1", "optim.lr=1e-12"]))
    meta = json.loads((run_dir / "model" / "meta.json").read_text())
    assert meta["initialisation"] == f"imagenet ({weights})"
    trained = torch.load(run_dir / "model" / "weights.pt", weights_only=True)
    assert torch.allclose(trained["trunk.conv1.weight"], reference["conv1.weight"], atol=1e-6)

    from urllib.error import URLError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ImretError, match=r"not in .*resnet18-f37072fd.pth and could not be downloaded.*--set model.weights="):
        train(recipe(tmp_path, train_shards, "ft2", ["model.backbone=resnet18", "model.init=imagenet"]))


def test_segmentation_on_shards_without_masks_is_refused(tmp_path, shards_without_masks):
    with pytest.raises(ImretError, match="segmentation needs masks"):
        train(recipe(tmp_path, shards_without_masks, "seg", ["task.name=segmentation", "model.backbone=resnet18"]))


def final_weights(run_dir: Path) -> dict:
    latest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return torch.load(latest / "state.pt", weights_only=True)["model"]


# 20 steps an epoch: accumulating 3 leaves a window of 2 at its end; SIGTERM at step 2 waits for step 3. The third
# case resumes an SGD with Nesterov momentum in the middle of its warm-up and cosine schedule.
@pytest.mark.parametrize("accum, signal_at, saved_at, optim", [
    (1, 3, 3, []), (3, 2, 3, []),
    (1, 5, 5, ["optim.name=sgd", "optim.nesterov=true", "optim.lr=0.05", "optim.schedule=cosine", "optim.warmup_epochs=0.5"])])  # fmt: skip
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, train_shards, monkeypatch, caplog, accum, signal_at,
                                                      saved_at, optim):  # fmt: skip
    extra = ["augment.hflip=true", "augment.crop=random_resized", "train.max_epochs=2", f"train.grad_accum_steps={accum}",
             *optim]  # fmt: skip
    straight_recipe = recipe(tmp_path, train_shards, "straight", extra)
    straight_recipe.run_dir.mkdir(parents=True)  # what a run killed before its first checkpoint left behind
    (straight_recipe.run_dir / "metrics.jsonl").write_text('{"epoch": 0, "step": 0, "split": "val", "loss": 9.0}\n')
    straight = train(straight_recipe)
    assert [r["loss"] for r in records(straight, "val")].count(9.0) == 0

    from imret.tasks.multilabel import MultilabelTask

    original = MultilabelTask.train_loss
    calls = {"n": 0}

    def sigterm_during_a_step(self, *args):
        calls["n"] += 1
        if calls["n"] == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal path: handler, finish the window, save
        return original(self, *args)

    monkeypatch.setattr(MultilabelTask, "train_loss", sigterm_during_a_step)
    resumed_recipe = recipe(tmp_path, train_shards, "resumed", extra)
    with pytest.raises(Terminated):
        train(resumed_recipe)
    monkeypatch.setattr(MultilabelTask, "train_loss", original)
    with pytest.raises(TrainingError, match=r"mid-epoch, .* data.batch_size_per_device 32 -> 16"):
        train(recipe(tmp_path, train_shards, "resumed", extra + ["data.batch_size_per_device=16"]))
    with caplog.at_level(logging.INFO, logger="imret.train"):
        resumed = train(resumed_recipe)
    assert "resuming from" in caplog.text and f"(epoch 0, step {saved_at})" in caplog.text
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    steps = [r["step"] for r in records(resumed, "train")]
    assert steps == sorted(set(steps))  # metrics.jsonl was cut back to the checkpoint, no duplicates
    assert [r["lr"] for r in records(resumed, "train")] == pytest.approx([r["lr"] for r in records(straight, "train")])


def test_the_exported_model_is_the_lowest_loss_even_below_min_delta(tmp_path, train_shards, monkeypatch):
    import imret.train

    losses, real_evaluate = iter([1.1, 1.0, 0.995, 0.99]), imret.train.evaluate

    def scripted(*args, **kwargs):
        metrics, figure_batch = real_evaluate(*args, **kwargs)
        return {**metrics, "loss": next(losses)}, figure_batch

    monkeypatch.setattr(imret.train, "evaluate", scripted)
    run = train(recipe(tmp_path, train_shards, "delta", ["train.max_epochs=3", "train.steps_per_epoch=1",
                                                         "train.early_stop_min_delta=0.01", "train.early_stop_patience=5"]))  # fmt: skip
    assert json.loads((run / "model" / "meta.json").read_text())["val"]["loss"] == 0.99


def test_a_finished_run_is_not_trained_again(tmp_path, train_shards, caplog):
    r = recipe(tmp_path, train_shards, "done", ["train.max_epochs=1"])
    train(r)
    with caplog.at_level(logging.INFO, logger="imret.train"):
        train(r)
    assert "already finished" in caplog.text


def test_a_failing_wandb_never_stops_training(tmp_path, train_shards, monkeypatch, caplog):
    import accelerate

    def broken(*args, **kwargs):
        raise RuntimeError("wandb server unreachable")

    monkeypatch.setattr(accelerate.Accelerator, "init_trackers", broken)
    with caplog.at_level(logging.WARNING, logger="imret.train"):
        run_dir = train(recipe(tmp_path, train_shards, "wb", ["log.wandb_mode=offline", "train.max_epochs=1"]))
    assert "W&B could not start (RuntimeError: wandb server unreachable)" in caplog.text
    assert (run_dir / "model" / "meta.json").is_file()


def test_sigterm_exits_143_and_a_rerun_resumes(tmp_path, train_shards):
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    overrides = tiny_recipe_overrides(train_shards, tmp_path / "runs", "sig") + ["train.max_epochs=3"]
    cmd = [sys.executable, "-m", "imret", "train", str(path)] + [a for o in overrides for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # wait for an event, not a time: the end of the first epoch
        if "epoch 0: loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest[-2000:]
    assert "run the same command again to resume" in rest
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    assert len(records(tmp_path / "runs" / "sig", "val")) == 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_runs_in_debug_mode(tmp_path, train_shards, path, monkeypatch, capsys):
    """What a user runs first: `imret train RECIPE --debug --set data.shards=...`, at 32 px to keep it short."""
    from torchvision.models import resnet18

    monkeypatch.chdir(tmp_path)
    overrides = [f"data.shards={train_shards}", "data.image_size=32", "data.load_size=40", "data.workers=0"]
    resolved = load_recipe(path, overrides)
    if resolved.model.backbone.startswith("timm:"):  # offline here: a local file of the model's tensors
        import timm

        weights = tmp_path / "timm.pth"
        torch.save(timm.create_model(resolved.model.backbone[5:], num_classes=0).state_dict(), weights)
        overrides.append(f"model.weights={weights}")
    elif resolved.model.init == "imagenet":  # offline here: a local weights file stands in for the hub download
        torch.save(resnet18().state_dict(), tmp_path / "imagenet.pth")
        overrides.append(f"model.weights={tmp_path / 'imagenet.pth'}")
    if resolved.model.init == "run":
        classifier = load_recipe(path.parent / "finetune.yaml", overrides)
        torch.save(resnet18().state_dict(), tmp_path / "imagenet.pth")
        assert main(["train", str(path.parent / "finetune.yaml"), "--debug"] + [a for o in overrides + [
            f"model.weights={tmp_path / 'imagenet.pth'}", f"run.name={resolved.model.weights.split('/')[-1]}"]
            for a in ("--set", o)]) == 0  # fmt: skip
        overrides.append(f"model.weights={classifier.run_dir.parent / (classifier.run.name + '-debug')}")
    assert main(["train", str(path), "--debug"] + [a for o in overrides for a in ("--set", o)]) == 0
    out = capsys.readouterr().out
    assert "first batch:" in out and "step 6:" in out and "compute" in out


def torchrun(*args, timeout=300):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])]))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_gloo_ranks_train_in_step_to_identical_weights(tmp_path, train_shards):
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    overrides = tiny_recipe_overrides(train_shards, tmp_path / "runs", "ddp") + [
        "log.wandb_mode=offline", "train.grad_accum_steps=3", "optim.scale_lr_with_batch=true"]  # fmt: skip
    result = torchrun("-m", "imret", "train", str(path), *[a for o in overrides for a in ("--set", o)])
    assert result.returncode == 0, result.stderr[-3000:]  # closing W&B left the ranks their process group
    assert list((tmp_path / "runs" / "ddp").glob("wandb/offline-run-*"))
    steps = len(records(tmp_path / "runs" / "ddp", "train"))
    assert "2 ranks agree: 20 steps each" in result.stderr and steps == 20  # 320 samples a rank, batch 32
    first_lr = records(tmp_path / "runs" / "ddp", "train")[0]["lr"]
    assert first_lr == pytest.approx(0.001 * (32 * 2 * 3) / 256)  # scaled linearly with the global batch
    assert (tmp_path / "runs" / "ddp" / "model" / "weights.pt").is_file()


def test_a_nan_on_one_rank_stops_both_with_the_same_message(tmp_path, train_shards):
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    overrides = tiny_recipe_overrides(train_shards, tmp_path / "runs", "nan") + ["train.max_nonfinite_steps=3"]
    result = torchrun(str(Path(__file__).parent / "ddp_train_probe.py"), str(path), str(tmp_path), "nan-on-rank-1",
                      *overrides)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ends = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert not ends[0]["ok"] and ends[0] == ends[1]
    assert "non-finite loss for 3 optimiser steps in a row" in ends[0]["error"] and "rank 1: synth-" in ends[0]["error"]
    assert "rank 0:" not in ends[0]["error"]


def test_compiled_training_on_two_ranks_exports_a_model_that_embeds_and_starts_a_run(tmp_path, train_shards):
    """train.compile under DDP: the export and checkpoints carry the model's own keys (no `_orig_mod.`), so
    `imret embed` and `model.init: run` take them."""
    from imret.embed import embed, load_embeddings

    path = tmp_path / "recipe.yaml"
    path.write_text("")
    overrides = tiny_recipe_overrides(train_shards, tmp_path / "runs", "compiled") + [
        "train.compile=true", "train.max_epochs=1", "train.steps_per_epoch=3"]  # fmt: skip
    result = torchrun("-m", "imret", "train", str(path), *[a for o in overrides for a in ("--set", o)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks agree: 3 steps each" in result.stderr
    run = tmp_path / "runs" / "compiled"
    for state in (torch.load(run / "model" / "weights.pt", weights_only=True), final_weights(run)):
        assert state and not [key for key in state if "_orig_mod" in key or key.startswith("module.")]
    vectors, _, keys, meta = load_embeddings(embed(str(run), train_shards, "val", out=tmp_path / "emb", workers=0))
    assert vectors.shape == (len(keys), 256) and meta["layer"] == "pooled"
    follow = train(recipe(tmp_path, train_shards, "follow", ["model.init=run", f"model.weights={run}",
                                                              "train.max_epochs=1", "train.steps_per_epoch=1"]))  # fmt: skip
    assert json.loads((follow / "model" / "meta.json").read_text())["initialisation"].startswith(f"run {run}")


def test_resuming_with_another_optimiser_or_schedule_is_refused(tmp_path, train_shards):
    run = train(recipe(tmp_path, train_shards, "opt", ["train.max_epochs=1", "train.steps_per_epoch=2"]))
    with pytest.raises(TrainingError, match=r"another optimiser or schedule \(optim.name adam -> sgd, optim.schedule "
                                            r"plateau -> cosine\).*model.weights=" + str(run)):  # fmt: skip
        train(recipe(tmp_path, train_shards, "opt", ["train.max_epochs=2", "train.steps_per_epoch=2", "optim.name=sgd",
                                                     "optim.schedule=cosine"]))  # fmt: skip


def two_ranks_at_b_and_one_process_at_2b(tmp_path, synth_dir, monkeypatch, extra: list[str]):
    """Shards of 8 samples, no shuffling, a model without BatchNorm, one epoch: `imret train` on 2 gloo ranks at batch 8
    (run "two") and in this process at batch 16 (run "one"). Returns (recipe file, overrides, run one, run two)."""
    from imret.data.build import build_shards
    from imret.models import BACKBONES
    from shard_tools import register_no_norm_backbone

    shards = tmp_path / "shards"
    build_shards(synth_dir, "folder", shards, val_fraction=0.2, samples_per_shard=8, workers=0)
    common = tiny_recipe_overrides(shards, tmp_path / "runs") + [
        "model.backbone=no-norm", "data.shuffle_buffer=0", "train.max_epochs=1", "optim.lr=0.01", *extra]  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    result = torchrun(str(Path(__file__).parent / "ddp_train_probe.py"), str(path), str(tmp_path), "no-norm",
                      *common, "run.name=two", "data.batch_size_per_device=8")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"ok": True}
    monkeypatch.setitem(BACKBONES, "no-norm", None)
    register_no_norm_backbone()
    one = train(load_recipe(path, common + ["run.name=one", "data.batch_size_per_device=16"]))
    return path, common, one, tmp_path / "runs" / "two"


def test_two_ranks_at_batch_b_reach_the_weights_of_one_process_at_batch_2b(tmp_path, synth_dir, monkeypatch):
    """DDP averages gradients: with shards of B samples and no shuffling, one process at 2B reads shards 2i and
    2i+1 in step i, which is what rank 0 and rank 1 read in their step i; a model without BatchNorm, no
    augmentation: the same start, the same steps, the same weights."""
    path, common, one, two = two_ranks_at_b_and_one_process_at_2b(tmp_path, synth_dir, monkeypatch, [])
    a, b = final_weights(one), final_weights(two)
    assert len(records(one, "train")) == len(records(two, "train")) == 6  # 96 images, 16 a step
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    from accelerate.utils import set_seed

    from imret.tasks import make_task

    set_seed(0)  # the start both runs had: seed + rank 0
    start = make_task(load_recipe(path, common), [f"c{i}" for i in range(12)]).build_model().state_dict()
    assert not torch.allclose(start["trunk.0.weight"], a["trunk.0.weight"], atol=1e-3)  # training moved them


METRIC_LOSSES = ["triplet", "multi_similarity", "contrastive", "supcon", "circle"]


def test_metric_validation_is_the_same_on_one_rank_and_on_two(tmp_path, train_shards):
    """The untrained model (rank 0's start on both) validated on 1 rank and on 2, batches falling differently, for
    every pair-based loss: a seeded sample of 100 of the 160 validation images, in chunks of 32 (a loss per chunk,
    weighted by what the chunk holds)."""
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    common = tiny_recipe_overrides(train_shards, tmp_path / "runs") + [
        "task.name=triplet", "train.max_epochs=1", "train.steps_per_epoch=1", "data.batch_size_per_device=24",
        "task.val_sample=100", "task.val_chunk=32"]  # fmt: skip
    result = torchrun(str(Path(__file__).parent / "ddp_validation_probe.py"), str(path), ",".join(METRIC_LOSSES), *common)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in METRIC_LOSSES:
        one = train(load_recipe(path, common + [f"loss.name={name}", f"run.name=one-{name}", "data.batch_size_per_device=16"]))
        single, double = records(one, "val")[0], records(tmp_path / "runs" / f"two-{name}", "val")[0]
        count = "triplets" if name == "triplet" else "positive_pairs"
        assert single["step"] == double["step"] == 0 and single[count] == double[count] > 0, name
        assert 60 < single["sampled"] < 140 and single["sampled"] == double["sampled"], name  # a sample, in chunks
        for metric in set(single) - {"epoch", "step", "split"}:
            assert single[metric] == pytest.approx(double[metric], rel=1e-5, abs=1e-6), (name, metric)


def test_a_gathered_pair_loss_on_two_ranks_steps_as_one_process_on_the_global_batch(tmp_path, synth_dir, monkeypatch):
    """loss.gather: each rank's loss sees both ranks' embeddings; with shards of B and no shuffling, two ranks at B
    reach the weights of one process at 2B (as for classification, test above), a model without BatchNorm."""
    path, common, one, two = two_ranks_at_b_and_one_process_at_2b(tmp_path, synth_dir, monkeypatch, [
        "task.name=triplet", "loss.name=supcon", "loss.gather=true", "train.steps_per_epoch=3"])  # fmt: skip
    a, b = final_weights(one), final_weights(two)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    alone = train(load_recipe(path, common + ["run.name=alone", "data.batch_size_per_device=8"]))
    assert not torch.allclose(final_weights(alone)["head.weight"], b["head.weight"], atol=1e-4)  # half the batch differs


def test_auto_precision_reads_a_plain_launchs_no_as_no_choice(monkeypatch):
    from imret.train import resolve_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_precision("auto") is None  # the launch config chose: accelerate applies it
    for unset in ("no", None):
        if unset:
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", unset)
        else:
            monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
        expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        assert resolve_precision("auto") == expected
    assert resolve_precision("no") == "no"
