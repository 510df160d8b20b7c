from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sim.scenario import Scenario, parse_scenario
from tests.documents import small_document as _small_document

SmallDocument = Callable[..., dict[str, Any]]


@pytest.fixture
def small_document() -> SmallDocument:
    """Factory of small scenario documents; keyword arguments replace top-level entries."""
    return _small_document


@pytest.fixture
def small_scenario() -> Scenario:
    return parse_scenario(_small_document())
