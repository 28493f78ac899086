"""Stored images are decoded under the configured ingest.wire limits, the ones the labeled intake checked.

An image past the default ``max_image_side`` (4096) is refused at intake under the default limits; with
raised limits it is acked, and the trainer's path (``Updater._load``, ``Experience.decode``) decodes it
instead of dropping it. The images are 8 pixels high, so they stay cheap to encode and decode.
"""

import json
import logging

import numpy as np

from agent_harness import tiny_agent_config
from cl_agent.client import LabeledClient
from cl_agent.config import WireSection
from cl_agent.experience import ExperienceStore
from cl_agent.ingest import COUNTER_NAMES, IngestService
from cl_agent.intake import Counters, LabeledIntake
from cl_agent.labels import LabelMap
from cl_agent.spool import Spool
from cl_agent.updater import Updater
from cl_agent.wire import encode_message

RAISED = {"ingest.wire.max_image_side": 8192, "ingest.wire.max_image_pixels": 64_000_000}
WIDE = 4100  # above the default max_image_side


def _wide(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, WIDE, 3), dtype=np.uint8)


def _intake_answer(tmp_path, wire: WireSection) -> dict:
    spool = Spool(tmp_path / "spool", 0, 10**9)
    intake = LabeledIntake(spool, LabelMap(tmp_path / "labels.json", 10), wire, Counters(COUNTER_NAMES), lambda: 0)
    [reply] = intake.process([encode_message("labeled", "cam", 1, [_wide(0)], labels=["a"])])
    return json.loads(reply[0])


def test_under_the_default_limits_intake_refuses_an_image_past_max_image_side(tmp_path):
    answer = _intake_answer(tmp_path, WireSection())
    assert (answer["kind"], answer["reason"], answer["image"]) == ("nack", "image_too_large", 0)
    assert f"8x{WIDE}" in answer["detail"] and "max_image_side 4096" in answer["detail"]


def test_under_raised_limits_intake_acks_it(tmp_path):
    answer = _intake_answer(tmp_path, WireSection(max_image_side=8192, max_image_pixels=64_000_000))
    assert answer["kind"] == "ack" and answer["accepted"] == 1


def test_images_acked_under_raised_limits_are_decoded_by_the_trainer_not_dropped(tmp_path, caplog):
    cfg, _ = tiny_agent_config(tmp_path, **RAISED)
    assert cfg.ingest.wire.max_image_side == 8192
    small = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with IngestService(cfg.ingest, cfg.spool, cfg.reservoir, cfg.experience, cfg.agent.workdir):
        with LabeledClient(cfg.ingest.labeled_endpoint, "robot", timeout_s=5.0) as client:
            for encoding in ("jpeg", "png", "raw"):
                ack = client.send([_wide(2), small], ["a", "b"], encoding=encoding)
                assert ack.ok and ack.accepted == 2, ack
            assert client.end_experience().ok
    assert ExperienceStore(cfg.agent.workdir).pending() == [0]

    updater = Updater(cfg)
    try:
        with caplog.at_level(logging.WARNING, logger="cl_agent.experience"):
            labeled, labels, _ = updater._load([0])
    finally:
        updater.close()
    size = cfg.model.image_size
    assert labeled.shape == (6, size, size, 3) and len(labels) == 6  # none dropped
    assert "dropped" not in caplog.text
    # Without the configured limits (a caller with no config) the wide images are dropped, by name.
    with caplog.at_level(logging.WARNING, logger="cl_agent.experience"):
        default, _, _ = ExperienceStore(cfg.agent.workdir).load(0).decode(size)
    assert len(default) == 3 and "dropped 3 labeled" in caplog.text and "image_too_large" in caplog.text
