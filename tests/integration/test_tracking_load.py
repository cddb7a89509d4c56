"""Concurrent logging load (issue 14, scenario 9): 8 processes x 1,000 metric points, logged at
the same time through RunLogger into a real `mlflow server` on SQLite and on PostgreSQL. No
point may be lost or doubled. The throughput is recorded (printed past pytest's capture, and as
the test's `tracking_load` property in junit XML), never asserted: it depends on the machine.
`python bench/tracking_load.py` runs the same load side by side."""

import json

import pytest

from tests.integration.tracking_load import (BACKENDS, NUM_CLIENTS, POINTS_PER_RUN, missing_or_extra_points, run_load,
                                             tracking_server)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    with tracking_server(request.param, tmp_path_factory.mktemp(f"mlflow-{request.param}")) as url:
        yield request.param, url


def test_concurrent_runs_lose_no_metric_point(server, record_property, capsys):
    backend, url = server
    result = run_load(url, label=backend)

    assert sorted(result.run_ids) == list(range(NUM_CLIENTS))
    assert len(set(result.run_ids.values())) == NUM_CLIENTS
    assert result.points == NUM_CLIENTS * POINTS_PER_RUN
    assert missing_or_extra_points(url, result.run_ids) == []

    record = {"backend": backend, "clients": NUM_CLIENTS, "points": result.points, "wall_s": round(result.wall_s, 2),
              "points_per_s": round(result.points_per_s)}
    record_property("tracking_load", json.dumps(record))
    with capsys.disabled():  # shown without -s
        print(f"\ntracking load: {json.dumps(record)}")
