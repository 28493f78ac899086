"""Fault tests: small versions of tools/chaos.py and tools/fuzz_wire.py, the spool limit at the agent level,
and the regressions those tools found (a deeply nested JSON header, an experience that cannot be trained)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from agent_harness import shut_down
from cl_agent.client import LabeledClient
from cl_agent.codec import encode_image
from cl_agent.experience import ExperienceStore
from cl_agent.inference import InferenceClient
from cl_agent.ingest import IngestService
from cl_agent.spool import read_records
from cl_agent.status import read_experience_records
from cl_agent.synthetic import CLASS_NAMES, make_batch
from cl_agent.updater import Updater
from cl_agent.wire import encode_message
from ingest_support import make_service, request

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import chaos  # noqa: E402
import fuzz_wire  # noqa: E402


def test_chaos_two_kills_lose_and_duplicate_nothing(tmp_path):
    result = chaos.run_chaos(trials=2, seed=3, workdir=tmp_path / "chaos", max_delay_s=8.0, train_timeout_s=120)
    assert result["problems"] == []
    for key in chaos.MUST_BE_ZERO:
        assert result[key] == 0, (key, result)
    assert result["acked_samples"] > 0 and result["labeled_in_experiences"] == result["acked_samples"]
    assert result["final_exit_code"] == 0 and result["all_trained"] and result["ok"]
    assert result["leftover_export_dirs"] == 0  # a killed export's temp folder is removed on restart
    assert result["versions_published"] >= 1


def test_fuzz_300_messages_agent_survives_and_acks_valid_traffic(tmp_path):
    result = fuzz_wire.run_fuzz(messages=300, seed=5, workdir=tmp_path / "fuzz")
    assert result["sent"] == 300 and set(result["sent_by_endpoint"]) == set(fuzz_wire.ENDPOINTS)
    assert result["agent_alive"] and result["valid_acked"], result["valid_failures"]
    assert result["valid_acked_count"] == result["valid_sent"] > 0
    assert result["rejected_total"] > 100 and "bad_json" in result["rejected_by_reason"]
    assert result["trainer_crashes"] == 0 and result["server_crashes"] == 0 and result["prediction_failures"] == []
    assert result["peak_rss_mb"] < result["rss_limit_mb"] and result["exit_code"] == 0 and result["ok"]


def test_full_spool_gives_negative_acks_and_the_agent_keeps_serving(tmp_path):
    cfg, path = chaos.agent_config(tmp_path, **{"spool.max_bytes": 30_000})
    agent = chaos.AgentProcess(path, tmp_path / "agent.log")
    rng = np.random.default_rng(0)
    client = LabeledClient(cfg.ingest.labeled_endpoint, "robot", timeout_s=5.0, retries=10, window=1)
    inference = InferenceClient(cfg.serve.endpoint, timeout_s=5.0, retries=5)
    answers = []
    try:
        # one small experience, trained and served
        ids = list(range(len(CLASS_NAMES)))
        assert client.send(list(make_batch(ids, rng, 16)), [CLASS_NAMES[c] for c in ids]).ok
        assert client.end_experience().ok
        deadline = time.monotonic() + 90
        while True:
            try:
                served = inference.predict(make_batch([0], rng, 16)).model_version
                break
            except Exception as error:  # noqa: BLE001 - no_model until the first version is loaded
                assert time.monotonic() < deadline, f"no model served: {error}"
                time.sleep(0.5)
        # fill the open experience until the spool refuses
        for _ in range(60):
            ids = list(rng.integers(0, len(CLASS_NAMES), 4))
            answers.append(client.send(list(make_batch(ids, rng, 16)), [CLASS_NAMES[c] for c in ids]))
            if not answers[-1].ok:
                break
        refused = [a for a in answers if not a.ok]
        assert refused and refused[-1].reason == "spool_full" and "max_bytes" in refused[-1].detail
        # the agent keeps serving predictions and answering (a newer version if the full experience was cut and trained)
        assert inference.predict(make_batch([1], rng, 16)).model_version >= served
        assert agent.alive()
        assert agent.terminate(cfg.agent.grace_period_s + 10) == 0
    finally:
        shut_down(agent, client, inference)
    acked = {a.seq for a in answers if a.ok}
    records = read_records(Path(cfg.agent.workdir) / "spool" / "labeled-000001.log")
    assert {r.seq for _, r in records} == acked  # every ack is stored, nothing refused is


def test_deeply_nested_json_header_is_refused_and_ingest_carries_on(tmp_path):
    with make_service(tmp_path) as service:
        answer = request(service.endpoints["labeled"], [b"[" * 50_000])
        assert answer["kind"] == "nack" and answer["reason"] == "bad_json"
        answer = request(service.endpoints["labeled"], [b"[" * 3000, b"x"])
        assert answer["reason"] == "bad_json"
        good = encode_message("labeled", "s", 1, list(make_batch([0], np.random.default_rng(0), 16)), labels=["a"])
        assert request(service.endpoints["labeled"], good)["kind"] == "ack"


def _send_a_cut_image_then_four_good_ones(client, rng, monkeypatch) -> None:
    """Experience 0: one PNG whose data is cut, stored as an older version would; then 4 good images, left open."""
    payload, shape = encode_image(make_batch([0], rng, 16)[0], "png")
    monkeypatch.setattr("cl_agent.intake.check_decodes", lambda payload, encoding: None)  # as stored by an older version
    assert client.send_encoded([payload[:60]], [shape], ["circle"], encoding="png").ok  # IHDR intact, data cut
    assert client.end_experience().experience == 0
    ids = [0, 1, 2, 3]
    assert client.send(list(make_batch(ids, rng, 16)), [CLASS_NAMES[c] for c in ids]).ok


def test_an_experience_that_cannot_be_trained_is_skipped_not_retried_forever(tmp_path, monkeypatch):
    """One undecodable image, or labels past model.num_classes, must not stop the trainer for good."""
    cfg, _ = chaos.agent_config(tmp_path)
    rng = np.random.default_rng(0)
    # a spool written under a config with more classes than this model has outputs (e.g. an older workdir)
    spool = dataclasses.replace(cfg.spool, max_classes=len(CLASS_NAMES) + 10)
    with IngestService(cfg.ingest, spool, cfg.reservoir, cfg.experience, cfg.agent.workdir) as service:
        client = LabeledClient(service.endpoints["labeled"], "robot", window=1)
        _send_a_cut_image_then_four_good_ones(client, rng, monkeypatch)
        assert client.send(list(make_batch([0, 1], rng, 16)), [len(CLASS_NAMES) + 3] * 2).ok  # past num_classes
        assert client.end_experience().experience == 1
        client.close()
    updater = Updater(cfg, "cpu")
    try:
        result = updater.run_once()
        assert result.experiences == [0, 1] and result.version == 1  # merged: the 4 usable images are trained
    finally:
        updater.close()
    records = read_experience_records(cfg.agent.workdir)
    assert [r["merged"] for r in records] == [[0, 1]] and ExperienceStore(cfg.agent.workdir).pending() == []


def test_a_single_bad_experience_is_recorded_as_skipped(tmp_path, monkeypatch):
    cfg, _ = chaos.agent_config(tmp_path, **{"agent.backlog_policy": "shorten"})
    rng = np.random.default_rng(0)
    with IngestService(cfg.ingest, cfg.spool, cfg.reservoir, cfg.experience, cfg.agent.workdir) as service:
        client = LabeledClient(service.endpoints["labeled"], "robot", window=1)
        _send_a_cut_image_then_four_good_ones(client, rng, monkeypatch)
        assert client.end_experience().experience == 1
        client.close()
    updater = Updater(cfg, "cpu")
    try:
        first = updater.run_once()
        assert first.experiences == [0] and first.version is None and "usable" in first.record["skipped"]
        second = updater.run_once()
        assert second.experiences == [1] and second.version == 1
        assert updater.run_once() is None
    finally:
        updater.close()
    records = read_experience_records(cfg.agent.workdir)
    assert [r["merged"] for r in records] == [[0], [1]]
