"""Training tasks, one module each. A task builds its model, computes the training loss of a batch, and turns
the gathered validation outputs into metrics (always including "loss", which drives the LR plateau, early
stopping and the choice of the best model)."""

from __future__ import annotations

from imret.tasks.base import Task
from imret.tasks.multilabel import MultilabelTask
from imret.tasks.rotation import RotationTask
from imret.tasks.segmentation import SegmentationTask
from imret.tasks.triplet import TripletTask

# Open set: add a task here and a value to TaskConfig.name.
TASKS: dict[str, type[Task]] = {
    "multilabel": MultilabelTask,
    "triplet": TripletTask,
    "rotation": RotationTask,
    "segmentation": SegmentationTask,
}


def make_task(recipe, classes: list[str], val_samples: int = 0) -> Task:
    return TASKS[recipe.task.name](recipe, classes, val_samples)
