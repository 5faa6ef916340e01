"""Shared pytest fixtures: tiny BIDS datasets built in code (see tests/fixtures.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fixtures import ImageSpec, build_dataset


@pytest.fixture
def bids_two(tmp_path: Path) -> Path:
    """Two subjects, one T2w each, with reference masks; sub-01 also has disc labels."""
    return build_dataset(tmp_path / "bids", [
        ImageSpec(sub="01", discs=True, seed=1),
        ImageSpec(sub="02", header="oblique", seed=2),
    ])


@pytest.fixture(autouse=True)
def _reset_conus_logging():
    """cli.configure_logging replaces the 'conus' logger's handlers; restore after each test."""
    logger = logging.getLogger("conus")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate
