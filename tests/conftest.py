"""Shared fixtures: quiet, private environments and tiny fake encoders that make task logic run in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


class TinyEncoder(nn.Module):
    """A timm-shaped feature extractor: conv + BN + pooled linear features, ``num_features`` wide."""

    def __init__(self, num_features: int = 16) -> None:
        super().__init__()
        self.num_features = num_features
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.fixture
def tiny_encoder() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder()


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves the environment as it found it. Code under test writes to ``os.environ`` for the processes
    it starts (MLflow's ``set_registry_uri`` sets ``MLFLOW_REGISTRY_URI``, a private Ray start sets Ray's
    variables), and a later test's subprocess would inherit it: a leaked registry URI once sent a model lookup to
    another test's store."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
