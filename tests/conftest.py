import os

import pytest

from store import Store

from .helpers import run_strata


@pytest.fixture
def store_root(tmp_path):
    root = str(tmp_path / "store")
    Store(root)  # the layout exists before any test snapshots it
    return root


@pytest.fixture
def store(store_root):
    return Store(store_root)


@pytest.fixture
def strata(store_root):
    """Run the real CLI in a subprocess against the test's own store."""
    def run(*args, **kw):
        return run_strata(store_root, *args, **kw)
    return run
