"""What an operator does to a working directory or a repository between runs, and what the trainer makes of it."""

from __future__ import annotations

import pytest

from agent_harness import tiny_agent_config
from cl_agent.errors import CLAgentError
from cl_agent.repository import ModelRepository
from cl_agent.status import read_experience_records
from cl_agent.updater import AGENT_ID_FILE, Updater
from test_updater import ingest_experiences


def _trained(tmp_path, class_sets, **extra):
    """A working directory whose experiences were each trained and published (shorten: one per update)."""
    cfg, _ = tiny_agent_config(tmp_path, **{"agent.backlog_policy": "shorten", "repository.announce_endpoint": "", **extra})
    ingest_experiences(cfg, class_sets)
    updater = Updater(cfg)
    try:
        while updater.run_once() is not None:
            pass
    finally:
        updater.close()
    return cfg


def test_a_deleted_newest_checkpoint_stops_the_start_and_the_flag_goes_on_from_the_older_one(tmp_path, caplog):
    cfg = _trained(tmp_path, [[0, 1], [1, 2]])
    checkpoints = tmp_path / "agent" / "checkpoints"
    (checkpoints / "exp-000001.pt").unlink()
    with pytest.raises(CLAgentError, match=r"experiences up to 1 were trained .* the newest checkpoint is of experience 0 .* "
                                           r"Restore checkpoints/exp-000001.pt .* agent.accept_lost_checkpoints=true"):
        Updater(cfg)
    cfg.agent.accept_lost_checkpoints = True
    with caplog.at_level("WARNING", logger="cl_agent.updater"):
        updater = Updater(cfg)
    updater.close()
    assert updater.last_trained == 0 and "going on from the checkpoint of experience 0" in caplog.text


def test_all_checkpoints_deleted_stops_the_start_instead_of_publishing_an_untrained_model(tmp_path):
    cfg = _trained(tmp_path, [[0, 1]])
    for path in (tmp_path / "agent" / "checkpoints").iterdir():
        path.unlink()
    with pytest.raises(CLAgentError, match="there is no checkpoint .* go on from an untrained model"):
        Updater(cfg)
    assert ModelRepository(cfg.repository.root, cfg.agent.model_name).versions() == [1]  # nothing published meanwhile


def test_another_agent_cannot_publish_into_the_same_model(tmp_path):
    first = _trained(tmp_path / "a", [[0, 1]])
    assert ModelRepository(first.repository.root, "student").load_manifest(1)["agent_id"] == \
        (tmp_path / "a" / "agent" / AGENT_ID_FILE).read_text().strip()
    second, _ = tiny_agent_config(tmp_path / "b", **{"repository.root": first.repository.root, "repository.announce_endpoint": ""})
    with pytest.raises(CLAgentError, match="published by another agent .* own agent.model_name or repository.root"):
        Updater(second)
    second.agent.model_name = "student-b"  # its own model: fine
    Updater(second).close()
    # Taking over on purpose: the working directory carries the other agent's identity.
    second.agent.model_name = "student"
    (tmp_path / "b" / "agent" / AGENT_ID_FILE).write_text((tmp_path / "a" / "agent" / AGENT_ID_FILE).read_text())
    Updater(second).close()


def test_version_numbers_do_not_come_back_after_the_repository_folder_is_deleted(tmp_path):
    import shutil

    cfg = _trained(tmp_path, [[0, 1], [1, 2]])
    assert [r["version"] for r in read_experience_records(cfg.agent.workdir)] == [1, 2]
    shutil.rmtree(cfg.repository.root)
    ingest_experiences(cfg, [[2, 3]])
    updater = Updater(cfg)  # the repository lost the checkpoint's version: exported again, as 3 (1 was another model)
    try:
        result = updater.run_once()
    finally:
        updater.close()
    assert result.version == 4 and ModelRepository(cfg.repository.root, "student").versions() == [3, 4]


def test_an_older_labels_json_with_fewer_names_than_published_stops_the_start(tmp_path, caplog):
    import json

    cfg = _trained(tmp_path, [[0, 1]])
    workdir = tmp_path / "agent"
    published = json.loads((workdir / "labels.json").read_text())["names"]
    assert len(published) == 2 and ModelRepository(cfg.repository.root, "student").load_manifest(1)["class_names"][:2] == published
    (workdir / "labels.json").write_text(json.dumps({"names": published[:1]}))  # a backup from before class 1 arrived
    with pytest.raises(CLAgentError, match=rf"holds 1 class names, but version 1 was published with 2 \(its class 1 is "
                                           rf"'{published[1]}'\).*cl-agent labels restore"):
        Updater(cfg)
    (workdir / "labels.json").write_text(json.dumps({"names": [published[0], "hound"]}))  # renamed by hand: allowed, logged
    with caplog.at_level("WARNING", logger="cl_agent.updater"):
        Updater(cfg).close()
    assert f"names class 1 'hound', version 1 '{published[1]}'" in caplog.text


def test_published_classes_at_other_ids_stop_the_start_a_rename_only_warns(tmp_path, caplog):
    """A published class name now at another id (labels.json put back in another order, or spool.classes in
    another order standing in for a lost one) is refused before ingestion opens; a new name at an id is a rename."""
    import json

    from cl_agent.agent import check_trainer_start
    from cl_agent.ingest import IngestService

    cfg = _trained(tmp_path, [[0, 1, 2]])
    workdir = tmp_path / "agent"
    path = workdir / "labels.json"
    a, b, c = json.loads(path.read_text())["names"]
    path.write_text(json.dumps({"names": [b, a, c]}))  # swapped
    with pytest.raises(CLAgentError, match=rf"labels.json names class 0 '{b}', but version 1 was published with '{b}' as "
                                           rf"class 1; its class 0 was '{a}'.*'{a}' \(published class 0, here 1\)"
                                           r".*published order.*cl-agent labels rename OLD NEW"):
        check_trainer_start(cfg)
    with pytest.raises(CLAgentError, match="published class 0, here 1"):
        Updater(cfg)  # the trainer's own start
    path.write_text(json.dumps({"names": [a, b, "fox", c]}))  # a published class moved to a new id
    with pytest.raises(CLAgentError, match=rf"'{c}' \(published class 2, here 3\)"):
        check_trainer_start(cfg)

    path.unlink()  # lost; spool.classes in another order would take its place
    cfg.spool.classes = [c, a, b]
    with pytest.raises(CLAgentError, match=rf"spool.classes \(standing in for the missing or empty .*labels.json\) names "
                                           rf"class 0 '{c}'.*cl-agent labels restore.*list spool.classes in the published order"):
        check_trainer_start(cfg)
    cfg.spool.classes = [a, b]
    with pytest.raises(CLAgentError, match=r"spool.classes \(standing in .*\) names 2 classes, but version 1 was published with 3"):
        check_trainer_start(cfg)
    cfg.spool.classes = [a, b, c, "fox"]  # the published order: the ingest start refuses the lost file itself
    check_trainer_start(cfg)
    with pytest.raises(CLAgentError, match="labels.json is missing, but experience 0 holds labeled samples"):
        IngestService(cfg.ingest, cfg.spool, cfg.reservoir, cfg.experience, workdir).start()
    assert not path.exists()

    path.write_text(json.dumps({"names": [a, "hound", c]}))  # a rename: the new name takes the old id
    cfg.spool.classes = [a, "hound", c, "fox"]  # extends labels.json
    check_trainer_start(cfg)
    with caplog.at_level("WARNING", logger="cl_agent.updater"):
        Updater(cfg).close()
    assert f"names class 1 'hound', version 1 '{b}'" in caplog.text
