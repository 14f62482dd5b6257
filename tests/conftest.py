"""Fixtures for every test: a free port; process-wide hooks put back after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import free_port


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The browser suite (tests/e2e, minutes) runs after everything else (seconds), so a
    quick failure shows first. The sort is stable: modules stay together."""
    items.sort(key=lambda item: "e2e" in item.path.parts)


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


@pytest.fixture(autouse=True)
def _process_hooks_and_leftovers() -> Iterator[None]:
    """A failing test must not leave a running app for the next one; and once no app runs,
    the SIGTERM/SIGINT handlers the first start installed are put back, so tests stay
    independent of their order."""
    from taskapp_notebook import registry

    before = set(registry.running())
    yield
    for app in registry.running():
        if app not in before:
            app.stop()
    if not registry.running():
        registry.uninstall_hooks()
