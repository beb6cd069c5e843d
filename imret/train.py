"""`imret train RECIPE`: one loop, top to bottom, on accelerate (DDP across processes and machines, mixed
precision, gradient accumulation). Infrastructure lives in the helpers below `train`; the science lives in
the task (imret/tasks/).

Run it with `accelerate launch -m imret train RECIPE` (every visible GPU), with
`torchrun --nproc_per_node N -m imret train RECIPE`, or plainly; `--debug` is a short single-process run.
Restarted in the same run directory, it resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object, parse_flag_from_env,
    set_seed,
)  # fmt: skip
from tqdm import tqdm

from imret import checkpoint
from imret.config import Recipe, check_against_shards, recipe_to_dict
from imret.data.augment import DeviceAugment
from imret.data.device_decode import check_decode_device, resolve_decode
from imret.data.manifest import load_manifest, manifest_hash, write_json_atomic
from imret.data.prefetch import DevicePrefetcher
from imret.data.shards import ShardLoader, make_loader
from imret.distributed import init_process_group
from imret.errors import ImretError
from imret.monitor import Monitor, wandb_mode
from imret.optim import Schedule, effective_lr, make_optimizer, param_groups, zero_momentum
from imret.step import NonfiniteGuard, RunningStats, TrainingError
from imret.system import native_bf16
from imret.tasks import Task, make_task

log = logging.getLogger("imret.train")
DEBUG_STEPS, DEBUG_VAL_BATCHES, DEBUG_EPOCHS, DEBUG_BATCH = 3, 2, 2, 8


class Terminated(Exception):
    """SIGTERM arrived: the current step finished and a checkpoint was saved. The CLI exits with 143."""


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress, or the next one to start
    step_in_epoch: int = 0  # batches of `epoch` already trained
    global_step: int = 0
    best_loss: float = math.inf  # the exported model's validation loss
    patience_loss: float = math.inf  # the loss that early stopping measures improvements of min_delta from
    bad_epochs: int = 0  # epochs since the validation loss last improved by min_delta
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    finished: bool = False


def train(recipe: Recipe, debug: bool = False) -> Path:
    if debug:
        recipe = debug_recipe(recipe)
    mode = "disabled" if debug else wandb_mode(recipe.log.wandb_mode)
    accelerator = make_accelerator(recipe, mode)
    if debug and accelerator.num_processes > 1:
        raise ImretError("--debug runs in one process: start it without torchrun or accelerate launch")
    check_decode_device(resolve_decode(recipe.data.decode, accelerator.device), accelerator.device)
    # each rank its own crops, flips and turns; DDP copies rank 0's initial weights to every rank in prepare()
    set_seed(recipe.run.seed + accelerator.process_index)
    main = accelerator.is_main_process

    manifest = load_manifest(recipe.data.shards)
    check_against_shards(recipe, manifest["has_masks"], recipe.data.shards)
    val_samples = manifest["splits"]["val"]["samples"]
    if debug:  # triplet validation samples from what is validated: 2 batches here, not the whole split
        val_samples = min(val_samples, DEBUG_VAL_BATCHES * recipe.data.batch_size_per_device)
    task = make_task(recipe, manifest["classes"], val_samples)
    with_masks = task.needs_masks or recipe.data.zero_background
    train_loader, val_loader = make_loaders(recipe, accelerator, with_masks)

    model = task.build_model()
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # training batches have one shape (drop_last): tuned once
    global_batch = recipe.data.batch_size_per_device * accelerator.num_processes * recipe.train.grad_accum_steps
    lr = effective_lr(recipe.optim, global_batch)
    optimizer = make_optimizer(param_groups(model, recipe, lr), recipe.optim, lr)
    scheduler = Schedule(optimizer, recipe.optim, optimizer_steps(train_loader, recipe, debug))
    model, optimizer = accelerator.prepare(model, optimizer)
    zero_momentum(optimizer.optimizer)
    if recipe.train.compile:  # after prepare: DDP inside the compiled wrapper, so `bare` gets the model's own keys
        model = torch.compile(model)
    train_augment = DeviceAugment(recipe.augment, recipe.data.image_size, recipe.load_size, True,
                                  recipe.data.zero_background, task.normalisation).to(accelerator.device)  # fmt: skip
    eval_augment = DeviceAugment(recipe.augment, recipe.data.image_size, recipe.load_size, False,
                                 recipe.data.zero_background, task.normalisation).to(accelerator.device)  # fmt: skip

    run_dir = recipe.run_dir
    if debug and main and run_dir.exists():
        shutil.rmtree(run_dir)  # a debug run always starts fresh
    accelerator.wait_for_everyone()
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        restore_interrupted_export(run_dir)
    progress = resume(accelerator, model, optimizer, scheduler, run_dir, recipe)
    if progress.finished:
        log.info("%s already finished (epoch %d); its model is in %s. To train it further, start a new run.name "
                 "with model.init=run and model.weights=%s", run_dir, progress.epoch, run_dir / "model", run_dir)  # fmt: skip
        return run_dir
    monitor = Monitor(accelerator, recipe, run_dir, mode)
    monitor.truncate_after(progress.global_step if progress.global_step else -1)  # a fresh start keeps none

    if main:
        log.info("training %s: epochs %d to %d, %d steps an epoch on %d process(es), from step %d", run_dir,
                 progress.epoch, recipe.train.max_epochs - 1, steps_this_epoch(train_loader, recipe, debug),
                 accelerator.num_processes, progress.global_step)  # fmt: skip
    if progress.global_step == 0:  # the untrained model: where the curves start, what training must beat
        metrics, _ = evaluate(task, accelerator, model, val_loader, eval_augment, 0, DEBUG_VAL_BATCHES if debug else None)
        monitor.log("val", 0, 0, metrics)

    guard = NonfiniteGuard(accelerator.device, accelerator.num_processes, device_skip=accelerator.scaler is None,
                           max_in_row=recipe.train.max_nonfinite_steps)  # fmt: skip
    stop, stopping = StopSignal(), False
    try:
        for epoch in range(progress.epoch, recipe.train.max_epochs):
            progress.epoch = epoch
            train_loader.set_epoch(epoch)
            steps = steps_this_epoch(train_loader, recipe, debug)
            model.train()
            if recipe.train.freeze_trunk_epochs:  # a warm-up of the heads: the trunk takes no step and keeps its statistics
                bare(accelerator, model).freeze_trunk(epoch < recipe.train.freeze_trunk_epochs)
            bar = tqdm(total=steps, initial=progress.step_in_epoch, desc=f"epoch {epoch}", disable=not main,
                       unit="step", dynamic_ncols=True)  # fmt: skip
            # resuming mid-epoch: the loader replays the epoch's order, and the batches already trained are dropped
            batches = DevicePrefetcher(islice(train_loader, progress.step_in_epoch, steps), accelerator.device, recipe.load_size)
            interval = Interval(batches)
            for index, batch in enumerate(batches, start=progress.step_in_epoch):
                images, masks = train_augment(batch["image"], batch.get("mask"))
                if accelerator.device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                if debug and progress.global_step == 0:
                    describe_batch(batch, images, masks)

                # accumulation windows start with each epoch and end with it, so a checkpoint (taken only at a
                # window's end) never holds half a window's gradients and a resume replays whole windows
                first, last = accumulation_window(index, steps, recipe.train.grad_accum_steps)
                sync = index == last
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss, stats = task.train_loss(model, images, masks, batch["labels"], epoch)
                    guard.observe(loss, batch["key"])
                    accelerator.backward(loss / (last - first + 1))  # a non-finite window is skipped at its end
                if sync:
                    guard.step(optimizer)
                    scheduler.step()
                interval.add({"loss": loss, **stats}, len(images) * accelerator.num_processes)

                progress.step_in_epoch, progress.global_step = index + 1, progress.global_step + 1
                bar.update(1)
                if debug:
                    interval.debug_line(progress.global_step, loss)
                if progress.global_step % recipe.log.every_n_steps == 0 or index + 1 == steps:
                    # the step loop's only read-backs, once an interval: statistics, skipped steps, any rank's SIGTERM
                    means = interval.read()
                    guard.check(accelerator.process_index, progress)
                    stopping = stopping or agree(accelerator, stop.requested)[0]
                    bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['images_per_s']:.0f}")
                    monitor.log("train", epoch, progress.global_step, {
                        **means, "lr": optimizer.param_groups[0]["lr"], "nonfinite_steps": progress.nonfinite_total})  # fmt: skip
                if stopping and sync:
                    guard.check(accelerator.process_index, progress)
                    save_checkpoint(accelerator, model, optimizer, scheduler, progress, recipe)
                    raise Terminated(f"SIGTERM: saved a checkpoint at step {progress.global_step}")
                every = recipe.checkpoint.every_n_steps
                if every and sync and (index + 1) % every == 0 and index + 1 < steps:
                    guard.check(accelerator.process_index, progress)
                    save_checkpoint(accelerator, model, optimizer, scheduler, progress, recipe)
            bar.close()

            sync_buffers(accelerator, model)
            metrics, figure_batch = evaluate(task, accelerator, model, val_loader, eval_augment, epoch,
                                             DEBUG_VAL_BATCHES if debug else None)  # fmt: skip
            scheduler.validated(metrics["loss"])
            monitor.log("val", epoch, progress.global_step, metrics)
            if main:
                log.info("epoch %d: %s", epoch, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if metrics["loss"] < progress.best_loss:
                progress.best_loss = metrics["loss"]
                if main:
                    export_model(bare(accelerator, model), task, recipe, manifest, metrics, progress, run_dir)
                    draw_figure(task, bare(accelerator, model), figure_batch, run_dir, monitor, progress)
            if metrics["loss"] < progress.patience_loss - recipe.train.early_stop_min_delta:
                progress.patience_loss, progress.bad_epochs = metrics["loss"], 0
            else:
                progress.bad_epochs += 1
            early_stop = progress.bad_epochs >= recipe.train.early_stop_patience
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            progress.finished = early_stop or epoch + 1 == recipe.train.max_epochs
            save_checkpoint(accelerator, model, optimizer, scheduler, progress, recipe)
            monitor.plot()
            if early_stop:
                log.info("early stop: no improvement of the validation loss for %d epochs", progress.bad_epochs)
                break
            if agree(accelerator, stop.requested)[0]:
                raise Terminated(f"SIGTERM: saved a checkpoint at the end of epoch {epoch}")
    finally:
        stop.restore()
        monitor.finish()
    check_ranks_agree(accelerator, model, progress)
    if main:
        log.info("done: best validation loss %.4f; model in %s", progress.best_loss, run_dir / "model")
    return run_dir


# ---------------------------------------------------------------- setup


def debug_recipe(recipe: Recipe) -> Recipe:
    recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, name=f"{recipe.run.name}-debug"))
    recipe.train = dataclasses.replace(recipe.train, max_epochs=DEBUG_EPOCHS)
    recipe.data = dataclasses.replace(recipe.data, batch_size_per_device=min(DEBUG_BATCH, recipe.data.batch_size_per_device))
    log.info("debug: one process, %d epochs of %d steps, batch %d, W&B off, run dir %s", DEBUG_EPOCHS, DEBUG_STEPS,
             recipe.data.batch_size_per_device, recipe.run_dir)  # fmt: skip
    return recipe


def resolve_precision(configured: str) -> str | None:
    """auto: the launch config's bf16 or fp16 when it names one (ACCELERATE_MIXED_PRECISION), else bf16 where the
    GPU supports it. A plain `accelerate launch` says "no" when nobody chose, so "no" counts as no choice: full
    precision is `train.mixed_precision: no` in the recipe."""
    if configured != "auto":
        return configured
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return None
    return "bf16" if native_bf16() else "no"


def make_accelerator(recipe: Recipe, mode: str) -> Accelerator:
    # under torchrun, the process group on keys of this restart attempt (a restarted job must not meet the last one's)
    init_process_group(timedelta(seconds=recipe.train.collective_timeout_s), parse_flag_from_env("ACCELERATE_USE_CPU"))
    return Accelerator(  # gradient accumulation is the loop's own (accumulation_window): accelerate's counter
        mixed_precision=resolve_precision(recipe.train.mixed_precision),  # knows no epochs and no resume
        # our loaders are already split by rank: never let rank 0 decode for everyone
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=recipe.train.collective_timeout_s)),
                         # a frozen trunk gives no gradients: DDP must not wait for them
                         DistributedDataParallelKwargs(find_unused_parameters=recipe.train.freeze_trunk_epochs > 0)],
        log_with=None if mode == "disabled" else "wandb",
    )


def make_loaders(recipe: Recipe, accelerator: Accelerator, with_masks: bool) -> tuple[ShardLoader, ShardLoader]:
    d = recipe.data
    common = dict(batch_size=d.batch_size_per_device, size=recipe.load_size, rank=accelerator.process_index,
                  world=accelerator.num_processes, seed=recipe.run.seed, with_masks=with_masks,
                  max_bad_fraction=d.max_bad_fraction, pin_memory=accelerator.device.type == "cuda",
                  decode=resolve_decode(d.decode, accelerator.device))  # fmt: skip
    train_loader = make_loader(d.shards, "train", training=True, workers=d.workers, shuffle_buffer=d.shuffle_buffer, **common)
    val_loader = make_loader(d.shards, "val", training=False, workers=min(d.workers, 2), **common)
    return train_loader, val_loader


def accumulation_window(index: int, steps: int, accum: int) -> tuple[int, int]:
    """First and last step (0-based, within the epoch) of the accumulation window that holds step `index`."""
    first = index - index % accum
    return first, min(first + accum, steps) - 1


def steps_this_epoch(loader: ShardLoader, recipe: Recipe, debug: bool, epoch: int | None = None) -> int:
    steps = loader.batches_in_epoch(loader.stream.epoch if epoch is None else epoch)
    if recipe.train.steps_per_epoch:
        steps = min(steps, recipe.train.steps_per_epoch)
    return min(steps, DEBUG_STEPS) if debug else steps


def optimizer_steps(loader: ShardLoader, recipe: Recipe, debug: bool) -> list[int]:
    """Optimiser steps of every epoch up to max_epochs (accumulation windows end with each epoch)."""
    accum = recipe.train.grad_accum_steps
    return [math.ceil(steps_this_epoch(loader, recipe, debug, epoch) / accum) for epoch in range(recipe.train.max_epochs)]


class StopSignal:
    """SIGTERM sets a flag; the loop finishes its step, saves, and exits 143 (torchrun restarts resume)."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def bare(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model without its DDP and torch.compile wrappers: state-dict keys as the model defines them."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def agree(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """True on every rank when true on any: one all-reduce for all flags."""
    values = torch.tensor([float(flag) for flag in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """DDP broadcasts buffers (BatchNorm statistics) from rank 0 only at the start of a forward pass, so after
    the last step of an epoch each rank holds its own: send rank 0's before validating and saving."""
    if accelerator.num_processes > 1:
        for buffer in bare(accelerator, model).buffers():
            torch.distributed.broadcast(buffer, src=0)


def check_ranks_agree(accelerator: Accelerator, model: torch.nn.Module, progress: Progress) -> None:
    """DDP keeps replicas identical; prove it at the end: every rank ran the same steps to the same weights."""
    digest = hashlib.sha256()
    for tensor in bare(accelerator, model).state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    reports = gather_object([(progress.global_step, digest.hexdigest()[:16])])
    if len(set(reports)) > 1:
        raise TrainingError(f"ranks disagree at the end of training (steps, weights checksum): {reports}")
    if accelerator.is_main_process and accelerator.num_processes > 1:
        log.info("%d ranks agree: %d steps each, weights checksum %s", len(reports), *reports[0])


class Interval:
    """One log interval: the loss and the task's statistics summed on the device, and the images and wall time
    counted on the host; `read` is the interval's one device-to-host copy. The time spent waiting for the loader
    (`input_wait_fraction`) is the part of the interval a faster input pipeline would win back."""

    def __init__(self, batches: DevicePrefetcher):
        self.batches = batches
        self.stats = RunningStats()
        self._restart()

    def _restart(self) -> None:
        self.images, self.start, self.waited = 0, time.perf_counter(), self.batches.wait_s
        self.step_start, self.step_waited = self.start, self.waited

    def add(self, values: dict[str, Any], images: int) -> None:
        self.stats.add(values)
        self.images += images

    def read(self) -> dict[str, float]:
        means = self.stats.read()  # waits for the interval's last step: the wall time below is the real one
        seconds = max(time.perf_counter() - self.start, 1e-9)
        means.update(images_per_s=self.images / seconds, input_wait_fraction=(self.batches.wait_s - self.waited) / seconds)
        self._restart()
        return means

    def debug_line(self, step: int, loss: torch.Tensor) -> None:
        """--debug only: each step's input wait and compute time, which needs a wait for the device every step."""
        value = float(loss.detach())
        now, waited = time.perf_counter(), self.batches.wait_s
        data = waited - self.step_waited
        tqdm.write(f"step {step}: data {1000 * data:.0f} ms, compute {1000 * (now - self.step_start - data):.0f} ms, "
                   f"loss {value:.4f}")  # fmt: skip
        self.step_start, self.step_waited = now, waited


def describe_batch(batch: dict[str, Any], images: torch.Tensor, masks: torch.Tensor | None) -> None:
    lines = ["first batch:"]
    for name, value in [*batch.items(), ("image after augmentation", images), ("mask after augmentation", masks)]:
        if isinstance(value, torch.Tensor):
            lines.append(f"  {name}: {tuple(value.shape)} {value.dtype}, "
                         f"range [{float(value.min()):.3g}, {float(value.max()):.3g}]")  # fmt: skip
        elif isinstance(value, list):
            lines.append(f"  {name}: {len(value)} items, first {value[0]!r}")
    tqdm.write("\n".join(lines))


# ---------------------------------------------------------------- validation and export


def evaluate(task: Task, accelerator: Accelerator, model: torch.nn.Module, loader: ShardLoader,
             augment: DeviceAugment, epoch: int, max_batches: int | None) -> tuple[dict[str, float], Any]:  # fmt: skip
    """Each rank scores its own validation shards (uneven counts are fine: no collective inside the loop, and
    the unwrapped model, so DDP does not broadcast buffers), then one gather brings every output to every rank."""
    net = bare(accelerator, model)
    net.eval()
    outputs: dict[str, list[np.ndarray]] = {}
    figure_batch = None
    with torch.no_grad():
        for batch in DevicePrefetcher(islice(loader, max_batches), accelerator.device, augment.load_size):
            images, masks = augment(batch["image"], batch.get("mask"))
            labels = batch["labels"]
            with accelerator.autocast():
                for key, value in task.val_outputs(net, images, masks, labels, batch["key"]).items():
                    outputs.setdefault(key, []).append(value)
            if figure_batch is None:
                figure_batch = (images[:8], masks[:8] if masks is not None else None, labels[:8])
    local = {key: np.concatenate(values) for key, values in outputs.items()}
    merged: dict[str, list[np.ndarray]] = {}
    for part in gather_object([local]):
        for key, value in part.items():
            merged.setdefault(key, []).append(value)
    if not merged:
        raise ImretError("the validation split is empty: rebuild the shards with --val-fraction above 0")
    metrics = task.val_metrics({key: np.concatenate(values) for key, values in merged.items()}, epoch)
    net.train()
    return metrics, figure_batch


def export_model(net: torch.nn.Module, task: Task, recipe: Recipe, manifest: dict, metrics: dict[str, float],
                 progress: Progress, run_dir: Path) -> None:  # fmt: skip
    """model/: weights.pt and meta.json, staged then swapped in, so model/ is never half-written."""
    stage, final, old = run_dir / ".model-tmp", run_dir / "model", run_dir / ".model-old"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    meta = {
        "task": task.name, "backbone": recipe.model.backbone, "classes": task.classes,
        "image_size": recipe.data.image_size, "load_size": recipe.load_size,
        "normalisation": task.normalisation,
        "zero_background": recipe.data.zero_background,
        "embedding": {"layer": net.embedding, "dim": task.embedding_dim},
        "initialisation": task.initialisation, "epoch": progress.epoch + 1, "step": progress.global_step,  # epochs completed
        "val": metrics, "shards": {"dir": recipe.data.shards, "manifest_hash": manifest_hash(manifest)},
        "recipe": recipe_to_dict(recipe), **task.export_meta(metrics),
    }  # fmt: skip
    try:
        checkpoint.save_file(state, stage / "weights.pt")
        write_json_atomic(stage / "meta.json", meta)
    except ImretError:  # a full disk: the model exported before stays in model/
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)  # a kill during the last export's cleanup leaves it behind
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_export(run_dir: Path) -> None:
    """A kill between export_model's two renames leaves the previous model only in .model-old: put it back; a kill
    while the stage was written leaves a half-written .model-tmp: remove it."""
    if not (run_dir / "model").exists() and (run_dir / ".model-old" / "meta.json").is_file():
        os.replace(run_dir / ".model-old", run_dir / "model")
    shutil.rmtree(run_dir / ".model-tmp", ignore_errors=True)


def draw_figure(task: Task, net: torch.nn.Module, figure_batch: Any, run_dir: Path, monitor: Monitor,
                progress: Progress) -> None:  # fmt: skip
    if figure_batch is None:
        return
    net.eval()
    with torch.no_grad():
        path = task.val_figure(net, *figure_batch, run_dir / "plots" / "val-examples.png")
    net.train()
    if path is not None:
        monitor.log_image("val/examples", path, progress.global_step)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(accelerator: Accelerator, model, optimizer, scheduler, progress: Progress, recipe: Recipe) -> None:
    directory = recipe.run_dir / "checkpoints"
    stage = checkpoint.staging_dir(directory, progress.global_step)
    if accelerator.is_main_process:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    accelerator.wait_for_everyone()
    stage.mkdir(parents=True, exist_ok=True)  # a machine that does not share the run directory makes its own
    checkpoint.write_rank_rng(stage, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {"model": bare(accelerator, model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler, "progress": dataclasses.asdict(progress),
                 "recipe": json.dumps(recipe_to_dict(recipe)), "world": accelerator.num_processes}  # fmt: skip
        final = checkpoint.finish_checkpoint(directory, stage, state, progress.global_step, recipe.checkpoint.keep)
        log.info("checkpoint %s saved (epoch %d, step %d)", final, progress.epoch, progress.global_step)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # still there only on a machine rank 0 does not share it with
        shutil.rmtree(stage, ignore_errors=True)


def check_resumable(state: dict[str, Any], path: Path, world: int, recipe: Recipe, has_rng: bool) -> None:
    """A mid-epoch checkpoint replays the epoch's batch order up to where it stopped; that order depends on the
    number of ranks, the loader workers and the batch size, so resuming with others would train some samples
    twice and skip others."""
    saved = json.loads(state["recipe"])
    saved_world, saved_data = state.get("world", world), saved["data"]
    if not has_rng and saved_world == world:
        raise TrainingError(f"{path}: this rank's RNG file is missing from a complete checkpoint; delete {path} "
                            f"to resume from the one before")  # fmt: skip
    saved_optim = {key: saved["optim"].get(key, default) for key, default in (("name", "adam"), ("schedule", "plateau"))}
    changed = [f"optim.{key} {saved_optim[key]} -> {getattr(recipe.optim, key)}" for key in saved_optim
               if saved_optim[key] != getattr(recipe.optim, key)]  # fmt: skip
    if changed:  # the optimiser's and the schedule's state belong to the ones that saved them
        raise TrainingError(f"{path} was saved with another optimiser or schedule ({', '.join(changed)}): resume with "
                            f"the checkpoint's, or start a new run.name with model.init=run and model.weights={recipe.run_dir}")  # fmt: skip
    if state["progress"]["step_in_epoch"] == 0:
        return
    now = {"ranks": world, "data.workers": recipe.data.workers, "data.batch_size_per_device": recipe.data.batch_size_per_device}
    then = {"ranks": saved_world, "data.workers": saved_data["workers"], "data.batch_size_per_device": saved_data["batch_size_per_device"]}
    changed = [f"{key} {then[key]} -> {now[key]}" for key in now if now[key] != then[key]]
    if changed:
        raise TrainingError(f"{path} is mid-epoch, and its batch order cannot be replayed with {', '.join(changed)}: "
                            f"resume with the checkpoint's settings, or delete it to resume from an earlier checkpoint")  # fmt: skip


def check_same_checkpoint(accelerator: Accelerator, latest: Path | None, run_dir: Path) -> None:
    """Every rank resumes from the same step, or none does: without a shared disk, the ranks on other machines
    than rank 0's find no checkpoint (or an old one of their own) and would train from elsewhere."""
    seen = gather_object([latest.name if latest else "none"])
    if len(set(seen)) > 1:
        ranks = ", ".join(f"rank {rank}: {name}" for rank, name in enumerate(seen))
        raise TrainingError(f"the ranks see different checkpoints in {run_dir / 'checkpoints'} ({ranks}): resuming needs "
                            f"the run directory on a filesystem every machine shares")  # fmt: skip


def resume(accelerator: Accelerator, model, optimizer, scheduler, run_dir: Path, recipe: Recipe) -> Progress:
    latest = checkpoint.latest_checkpoint(run_dir / "checkpoints")
    check_same_checkpoint(accelerator, latest, run_dir)
    if latest is None:
        return Progress()
    state, rng = checkpoint.load_checkpoint(latest, accelerator.process_index)
    check_resumable(state, latest, accelerator.num_processes, recipe, rng is not None)
    bare(accelerator, model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if rng is not None:
        checkpoint.set_rng_state(rng)
    progress = Progress(**state["progress"])
    if accelerator.is_main_process:
        log.info("resuming from %s (epoch %d, step %d)", latest, progress.epoch, progress.global_step)
        saved = json.loads(state["recipe"])
        changed = [f"{s}.{k}" for s, values in recipe_to_dict(recipe).items() for k, v in values.items()
                   if saved.get(s, {}).get(k) != v]  # fmt: skip
        if changed:
            log.warning("the recipe differs from the checkpoint's in %s", ", ".join(changed))
    return progress
