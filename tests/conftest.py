"""Shared fixtures: the real offline models (loaded once per session) and tiny random configs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    from kvdistill import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    from kvdistill import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def minilm():
    from kvdistill import load_model

    return load_model("minilm-l6")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
