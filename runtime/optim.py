"""The optimizers a plan can name (AdamW, SGD with momentum), built over whatever tensors
this rank updates: its parameters, or its parameter-server shards."""

from __future__ import annotations

import torch

from .config import TrainConfig


def build_optimizer(name: str, tensors: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    lr = cfg.learning_rate(name)
    if name == "adamw":
        return torch.optim.AdamW(tensors, lr=lr, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(tensors, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; use adamw or sgd")
