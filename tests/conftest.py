"""Shared fixtures: a real brokerd process on a loopback port with a real data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker import ROOT, START_TIMEOUT, BrokerProcess, admin_exchange  # noqa: F401  (re-exported)


@pytest.fixture
def broker_factory(tmp_path):
    started: list[BrokerProcess] = []

    def make(*args: str, data_dir: Path | None = None, env: dict | None = None) -> BrokerProcess:
        b = BrokerProcess(data_dir or tmp_path / f"data{len(started)}", *args, env=env)
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.terminate()


@pytest.fixture
def broker(broker_factory) -> BrokerProcess:
    return broker_factory()
