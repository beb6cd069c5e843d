"""What a run reports: `metrics.jsonl`, `config.yaml` and learning-curve PNGs on rank 0 always, and W&B through
accelerate's trackers when enabled. Monitoring never kills training: a W&B failure becomes one warning and
the run goes on without it."""

from __future__ import annotations

import json
import logging
import netrc
import os
from collections import defaultdict
from pathlib import Path

from imret.config import Recipe, recipe_to_dict, recipe_to_yaml

log = logging.getLogger("imret.train")


def wandb_mode(configured: str) -> str:
    """The recipe's mode, else WANDB_MODE, else online with an API key and offline without one. Chosen before
    init: falling back to offline after a failed online init can hang."""
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class Monitor:
    def __init__(self, accelerator, recipe: Recipe, run_dir: Path, mode: str):
        self.accelerator, self.run_dir = accelerator, run_dir
        self.main = accelerator.is_main_process
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb = False
        if self.main:
            (run_dir / "plots").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(recipe_to_yaml(recipe))
        if mode != "disabled":
            self._start_wandb(recipe, mode)

    def _start_wandb(self, recipe: Recipe, mode: str) -> None:
        try:
            self.accelerator.init_trackers(
                recipe.log.wandb_project, config=recipe_to_dict(recipe),
                init_kwargs={"wandb": {"name": recipe.run.name, "mode": mode, "dir": str(self.run_dir)}},
            )  # fmt: skip
            self.wandb = True
            if mode == "offline" and self.main:
                log.info("W&B is offline (no API key): sync later with `wandb sync %s/wandb/offline-run-*`", self.run_dir)
        except Exception as exc:  # noqa: BLE001 (any W&B failure must leave training running)
            log.warning("W&B could not start (%s: %s); training goes on without it", type(exc).__name__, exc)

    def truncate_after(self, step: int) -> None:
        """Drop records logged after the checkpoint (all of them with -1): the run logs them again."""
        if self.main and self.metrics_path.is_file():
            kept = [line for line in self.metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.metrics_path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, split: str, epoch: int, step: int, values: dict[str, float]) -> None:
        if self.main:
            record = {"epoch": epoch, "step": step, "split": split, **values}
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        self._wandb_call("log", {f"{split}/{k}": v for k, v in values.items()}, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        from PIL import Image

        if self.wandb and self.main:
            self._wandb_call("log_images", {name: [Image.open(path)]}, step=step)

    def _wandb_call(self, method: str, values: dict, step: int) -> None:
        if not self.wandb:
            return
        try:
            tracker = self.accelerator.get_tracker("wandb", unwrap=False)
            getattr(tracker, method)(values, step=step)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B %s failed (%s: %s); W&B is off for the rest of this run", method, type(exc).__name__, exc)
            self.wandb = False

    def plot(self) -> None:
        """One PNG per metric: training values by step, validation values at the end of each epoch."""
        if not self.main or not self.metrics_path.is_file():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for line in self.metrics_path.read_text().splitlines():
            record = json.loads(line)
            for key, value in record.items():
                if key not in ("epoch", "step", "split") and isinstance(value, (int, float)):
                    series[key][record["split"]].append((record["step"], value))
        for metric, splits in series.items():
            fig, ax = plt.subplots(figsize=(5, 3.2))
            for split, points in sorted(splits.items()):
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if split == "val" else None, markersize=3, label=split)
            ax.set_xlabel("step")
            ax.set_title(metric)
            ax.legend()
            fig.tight_layout()
            fig.savefig(self.run_dir / "plots" / f"{metric.replace('/', '_')}.png", dpi=80)
            plt.close(fig)

    def finish(self) -> None:
        """Closes the W&B run only: accelerator.end_training() would also destroy the process group, which the
        end-of-run checks and a study's later stages still use."""
        if self.wandb:
            try:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B did not finish cleanly (%s: %s)", type(exc).__name__, exc)
