"""Shared fixtures: tiny random-weight models built once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nbllm  # first: it loads the fast BLAS, which must happen before mlx.core is imported
from nbllm.testing import make_image, make_model, make_vision_model

ARCHS = ["llama", "qwen3", "gemma3"]
VISION_ARCHS = ["qwen2_vl", "gemma3"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding one tiny model per architecture (built once)."""
    root = tmp_path_factory.mktemp("models")
    for arch in ARCHS:
        make_model(root / arch, arch)
    return root


@pytest.fixture(scope="session")
def lm(model_dir: Path) -> nbllm.LM:
    """The tiny llama fixture, loaded through the real ``nbllm.load``."""
    return nbllm.load(model_dir / "llama")


@pytest.fixture(scope="session", params=ARCHS)
def any_lm(request: pytest.FixtureRequest, model_dir: Path) -> nbllm.LM:
    """Each fixture architecture in turn."""
    return nbllm.load(model_dir / request.param)


@pytest.fixture(scope="session")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vision")
    for arch in VISION_ARCHS:
        make_vision_model(root / arch, arch)
    make_image(64, 48, seed=0).save(root / "a.png")
    make_image(80, 56, seed=3).save(root / "b.png")
    return root


@pytest.fixture(scope="session")
def qwen(vision_dir: Path) -> nbllm.VisionLM:
    lm = nbllm.load(vision_dir / "qwen2_vl")
    assert isinstance(lm, nbllm.VisionLM)
    return lm


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The llama.cpp tests last: scripts/test builds their server in the background meanwhile."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_remote_llamacpp.py"))
