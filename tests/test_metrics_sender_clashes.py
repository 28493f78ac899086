"""Sender-id clashes reach /metrics: the ingest counters fed through AgentMetrics.sync_ingest, scraped over HTTP."""

import urllib.request

from cl_agent.client import FrameClient
from cl_agent.metrics import AgentMetrics
from ingest_support import make_service, send_two_streams_under_one_id


def _scrape(metrics: AgentMetrics) -> set[str]:
    server, port = metrics.serve_http("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return set(response.read().decode().splitlines())
    finally:
        server.stop()


def test_a_sender_id_clash_raises_frames_sender_clashes_total(tmp_path):
    metrics = AgentMetrics()
    with make_service(tmp_path) as service:
        metrics.sync_ingest(service.counters())
        assert "cl_agent_frames_sender_clashes_total 0.0" in _scrape(metrics)
        endpoint = service.endpoints["frames"]
        with FrameClient(endpoint, "cam-1") as first, FrameClient(endpoint, "cam-1") as second:
            accepted = send_two_streams_under_one_id(service, first, second)
        counters = service.counters()
    assert counters["frames_sender_clashes"] == 1
    metrics.sync_ingest(counters)
    lines = _scrape(metrics)
    assert "cl_agent_frames_sender_clashes_total 1.0" in lines
    assert f'cl_agent_ingest_accepted_total{{kind="frame"}} {float(accepted)}' in lines
    metrics.sync_ingest(counters)  # the same totals again: no double count
    assert metrics.value("frames_sender_clashes_total") == 1


def test_sync_ingest_feeds_every_ingest_total():
    metrics = AgentMetrics()
    counters = {
        "labeled_acked": 4, "frames_accepted": 9, "control_accepted": 1, "rejected": {"bad_json": 2},
        "frames_dropped": 3, "frames_sender_clashes": 2, "experiences_cut": 5, "experiences_pruned": 1,
    }
    metrics.sync_ingest(counters)
    assert metrics.value("frames_sender_clashes_total") == 2
    assert metrics.value("frames_dropped_total") == 3
    assert metrics.value("ingest_accepted_total", kind="end_experience") == 1
    assert metrics.value("ingest_rejected_total", reason="bad_json") == 2
    assert (metrics.value("experiences_cut_total"), metrics.value("experiences_pruned_total")) == (5, 1)
