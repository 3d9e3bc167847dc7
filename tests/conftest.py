"""Suite-wide rules.

``FEDSPATIAL_FORBID_SKIPS=1`` (set by ``.ci/run``) turns every skipped test into a
failure: in CI a missing optional dependency or data set must not silently drop the
checks behind a README claim. On a user's machine without an extra, skips stay skips.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("FEDSPATIAL_FORBID_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but FEDSPATIAL_FORBID_SKIPS=1 forbids skips (install the test extra, provide the data): {reason}"


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run, task and node ids Flower gives a ServerApp process: ``Message()`` reads
    them, so unit tests that build server messages outside Flower need them set."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
