"""Distillation: one trainer, a registry of losses, progressive / selective / robust methods.

``DistillTrainer`` (trainer) runs every method; losses register by name (losses, robust,
selective); ``ProgressiveDistiller`` (progressive) runs stages and iterative prune → distill;
recipes load from YAML (recipe); the ``distill`` pass (pass_) plugs it into pipelines.
"""

from .batches import Rebatched, TensorBatches
from .capture import ModelOutputs, Want, run_model
from .config import StudentSpec, TrainConfig, TrainResult
from .losses import (
    AttentionLoss,
    CosineEmbeddingLoss,
    DistillLoss,
    HiddenMSELoss,
    KDLoss,
    LossInputs,
    available_losses,
    make_loss,
    register_loss,
    uniform_layer_map,
)
from .trainer import DistillTrainer

__all__ = [
    "AttentionLoss",
    "CosineEmbeddingLoss",
    "DistillLoss",
    "DistillTrainer",
    "HiddenMSELoss",
    "KDLoss",
    "LossInputs",
    "ModelOutputs",
    "Rebatched",
    "StudentSpec",
    "TensorBatches",
    "TrainConfig",
    "TrainResult",
    "Want",
    "available_losses",
    "make_loss",
    "register_loss",
    "run_model",
    "uniform_layer_map",
]
