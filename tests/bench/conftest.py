"""Bench harness tests: tiny embedded model on the CPU; they check the harness, not speed."""

from __future__ import annotations

import warnings

import pytest

from synerdiff.contract.config import EMBEDDED_MODEL_DIR
from synerdiff.models.loader import load_model


@pytest.fixture(scope="session")
def tiny_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(EMBEDDED_MODEL_DIR, "cpu", "float32")


TINY_RUN = ["--model", "tiny", "--device", "cpu", "--dtype", "float32"]
