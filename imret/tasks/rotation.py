"""Self-supervised rotation prediction: 4 classes for 0, 90, 180 and 270 degrees (the study merged 180 and
270), cross-entropy. Training rotates each image by a random quarter turn; validation scores all four."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imret.data.augment import quarter_turns
from imret.models import RetrievalNet
from imret.tasks.base import Task, cpu

TURNS = 4


class RotationTask(Task):
    name = "rotation"

    def build_model(self) -> nn.Module:
        trunk, features = self.make_trunk()
        self.embedding_dim = features
        return RetrievalNet(trunk, nn.Linear(features, TURNS), embedding="pooled")

    def train_loss(self, model, images, masks, labels, epoch):
        turns = torch.randint(0, TURNS, (len(images),), device=images.device)
        logits = model(quarter_turns(images, turns)).float()
        return F.cross_entropy(logits, turns), {"accuracy": (logits.argmax(1) == turns).float().mean()}

    def val_outputs(self, model, images, masks, labels, keys):
        losses, correct = [], []
        for k in range(TURNS):
            turns = torch.full((len(images),), k, device=images.device)
            logits = model(quarter_turns(images, turns)).float()
            losses.append(F.cross_entropy(logits, turns, reduction="none"))
            correct.append((logits.argmax(1) == turns).float())
        return {"loss": cpu(torch.stack(losses, 1).mean(1)), "correct": cpu(torch.stack(correct, 1).mean(1))}

    def val_metrics(self, outputs, epoch):
        return {"loss": float(np.mean(outputs["loss"])), "accuracy": float(np.mean(outputs["correct"]))}
