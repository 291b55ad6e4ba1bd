"""Fixtures for the runner, sweep and CLI tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_support import TINY

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session, as a sweep shares one."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny(tmp_path, cache_dir):
    def overrides(*extra: str, results: Path | None = None) -> list[str]:
        return [*TINY, f"cache_dir={cache_dir}", f"results_dir={results or tmp_path / 'runs'}",
                *extra]
    return overrides


@pytest.fixture
def compose():
    from fp4_ablate.hydra_app import compose as _compose
    return _compose
