"""Puts the bridge package (embedded in the Rust crate) on sys.path, and offers the
golden protocol fixtures shared with the Rust tests."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BRIDGE_DIR = os.path.join(ROOT, "crates", "solidflow", "src", "executor", "dask", "bridge")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "protocol")
sys.path.insert(0, BRIDGE_DIR)


def read_fixture(name: str) -> list[dict[str, Any]]:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Collect:
    """Stands in for the server's stdout writer."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def emit(self, obj: Any) -> None:
        # What goes on the wire is JSON: keep exactly that.
        self.messages.append(json.loads(json.dumps(obj, default=str)))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        yield


@pytest.fixture
def out() -> Collect:
    return Collect()
