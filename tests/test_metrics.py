"""AgentMetrics: private registries, counter semantics, and a real HTTP scrape of /metrics."""

import math
import socket
import urllib.request

import pytest

from cl_agent.config import MetricsSection
from cl_agent.errors import CLAgentError
from cl_agent.metrics import METRICS, AgentMetrics, serve_from_config


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def test_two_instances_have_separate_registries():
    a, b = AgentMetrics(), AgentMetrics()
    a.inc_rejected("bad_json", 3)
    assert a.value("ingest_rejected_total", reason="bad_json") == 3
    assert b.value("ingest_rejected_total", reason="bad_json") is None


def test_every_documented_metric_is_exposed():
    text = AgentMetrics().render().decode()
    for name, (kind, _, _) in METRICS.items():
        assert f"# TYPE cl_agent_{name} {kind}" in text


def test_sync_totals_turns_cumulative_totals_into_increments():
    m = AgentMetrics()
    m.sync_totals(accepted={"labeled": 5, "frame": 10}, dropped=2)
    m.sync_totals(accepted={"labeled": 8, "frame": 10}, dropped=2, experiences_cut=1)
    assert m.value("ingest_accepted_total", kind="labeled") == 8
    assert m.value("ingest_accepted_total", kind="frame") == 10
    assert m.value("frames_dropped_total") == 2
    assert m.value("experiences_cut_total") == 1
    # The source restarted from zero: its new total is added, the counter never goes down.
    m.sync_totals(accepted={"labeled": 3})
    assert m.value("ingest_accepted_total", kind="labeled") == 11
    with pytest.raises(ValueError, match="-1"):
        m.sync_totals(dropped=-1)


def test_online_accuracy_is_unknown_until_set_and_checked():
    m = AgentMetrics()
    assert math.isnan(m.value("online_accuracy"))
    m.set_online_accuracy(0.25)
    assert m.value("online_accuracy") == 0.25
    with pytest.raises(ValueError, match="1.5"):
        m.set_online_accuracy(1.5)


def test_http_scrape_shows_updated_metrics():
    m = AgentMetrics()
    m.inc_accepted("labeled", 4)
    m.inc_rejected("part_too_large")
    m.inc_dropped(7)
    m.set_counts(spool_samples=120, spool_bytes=4096, reservoir_size=50, backlog=2)
    m.inc_experiences_cut(3)
    m.inc_experiences_trained()
    m.observe_update(12.5, {"ce": 0.75, "mlkd": 0.125})
    m.observe_export(0.4)
    m.set_online_accuracy(0.5)
    m.set_published_version(3)
    m.set_served_version(2)
    m.inc_publish_failures()
    m.inc_trainer_failures(2)

    server, port = m.serve_http("127.0.0.1", 0)
    try:
        assert port > 0 and server.port == port
        text = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.stop()

    lines = set(text.splitlines())
    for expected in [
        'cl_agent_ingest_accepted_total{kind="labeled"} 4.0',
        'cl_agent_ingest_rejected_total{reason="part_too_large"} 1.0',
        "cl_agent_frames_dropped_total 7.0",
        "cl_agent_spool_samples 120.0",
        "cl_agent_spool_bytes 4096.0",
        "cl_agent_reservoir_size 50.0",
        "cl_agent_experiences_cut_total 3.0",
        "cl_agent_experiences_trained_total 1.0",
        "cl_agent_backlog_experiences 2.0",
        "cl_agent_update_duration_seconds_count 1.0",
        "cl_agent_update_duration_seconds_sum 12.5",
        'cl_agent_update_duration_seconds_bucket{le="30.0"} 1.0',
        'cl_agent_update_duration_seconds_bucket{le="10.0"} 0.0',
        "cl_agent_export_duration_seconds_count 1.0",
        'cl_agent_loss{term="ce"} 0.75',
        'cl_agent_loss{term="mlkd"} 0.125',
        "cl_agent_online_accuracy 0.5",
        "cl_agent_published_version 3.0",
        "cl_agent_served_version 2.0",
        "cl_agent_publish_failures_total 1.0",
        "cl_agent_trainer_failures_total 2.0",
    ]:
        assert expected in lines, expected


def test_stop_closes_the_port():
    server, port = AgentMetrics().serve_http("127.0.0.1", 0)
    server.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(CLAgentError, match=f"127.0.0.1:{busy}.*in use"):
            AgentMetrics().serve_http("127.0.0.1", busy)


def test_serve_from_config():
    m = AgentMetrics()
    assert serve_from_config(m, MetricsSection(enabled=False)) is None
    server = serve_from_config(m, MetricsSection(enabled=True, host="127.0.0.1", port=0))
    try:
        assert "cl_agent_served_version" in scrape(server.url)
    finally:
        server.stop()


def test_docs_list_every_metric():
    from pathlib import Path

    from cl_agent.metrics import SERVE_METRICS

    docs = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    for name, (kind, labels, *_) in {**METRICS, **SERVE_METRICS}.items():
        row = next((line for line in docs.splitlines() if line.startswith(f"| `cl_agent_{name}` |")), None)
        assert row is not None, name
        assert f"| {kind} |" in row
        for label in labels:
            assert f"`{label}`" in row


def test_the_serving_process_metrics_port_may_not_be_the_agents():
    from cl_agent.config import load_config

    with pytest.raises(ValueError, match="serve.metrics_port.*metrics.port too"):
        load_config(None, {"serve.metrics_port": 9109, "metrics.port": 9109})
    assert load_config(None, {"serve.metrics_port": 9109, "metrics.enabled": False}).serve.metrics_port == 9109
    assert load_config(None, {"serve.metrics_port": 9110}).serve.metrics_port == 9110



def test_every_serving_metric_reads_a_counter_the_server_has_and_is_scraped_from_a_running_server(tmp_path):
    from cl_agent.config import ServeSection
    from cl_agent.metrics import SERVE_METRICS, ServerMetrics, serve_registry
    from cl_agent.repository import ModelRepository
    from cl_agent.server import Server

    counters = {name for name, metric in SERVE_METRICS.items() if metric.kind == "counter"}
    assert all(SERVE_METRICS[name].counter_key for name in counters), "a serving counter without a Server counter key"

    repository = ModelRepository(tmp_path / "models", "student")
    with Server(repository, ServeSection(endpoint="tcp://127.0.0.1:*", poll_s=0.05)) as server:
        keys = {name: metric.counter_key for name, metric in SERVE_METRICS.items() if metric.counter_key}
        missing = {name: key for name, key in keys.items() if key not in server.counters}
        assert not missing, f"metrics read keys Server.counters does not have: {missing}"
        endpoint = serve_registry(ServerMetrics(server).registry, "127.0.0.1", 0, "serve.metrics_port")
        try:
            text = scrape(endpoint.url)
        finally:
            endpoint.stop()
    lines = text.splitlines()
    for name, metric in SERVE_METRICS.items():
        assert f"# TYPE cl_agent_{name} {metric.kind}" in lines, name
    for name in counters:  # no request yet: every counter is there, at zero
        assert f"cl_agent_{name} 0.0" in lines, name
    assert "cl_agent_serve_largest_batch 0.0" in lines
