"""Model zoo: ``create_model(name, num_classes=..., **kwargs)``, ``list_models()``, ``model_info(name)``,
``register_model`` (see :mod:`autocompress.models.registry`).

Importing this package registers every zoo model: ``lenet5``, ``fmnist_cnn`` (1x28x28);
``vgg11/13/16/19``, ``resnet20/32/56/110``, ``resnet18``, ``resnet50`` (CIFAR, 3x32x32); and any
torchvision classifier as ``torchvision:<name>``.
"""
from __future__ import annotations

from . import fmnist, lenet, resnet_cifar, vgg  # noqa: F401  (registers the models)
from .registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
