"""Model repository: Triton layout, atomic versions that only increase, retention, rollback, announcements."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zmq
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.errors import CLAgentError
from cl_agent.repository import OPTIMIZED_DATA_FILE, OPTIMIZED_FILE, Announcer, ModelRepository, OptimizedModel, parse_announcement, sha256_file

CLASSES = ["cat", "dog", "cup"]


def fake_model(tmp_path, content: bytes):
    path = tmp_path / f"src-{len(content)}-{content[:4].hex()}.onnx"
    path.write_bytes(content)
    return path


def publish(repo: ModelRepository, tmp_path, content: bytes, **extra) -> int:
    return repo.publish(fake_model(tmp_path, content), {"class_names": CLASSES, "image_size": 16, **extra})


def test_publish_writes_triton_layout_and_full_manifest(tmp_path):
    repo = ModelRepository(tmp_path / "models", "student")
    v1 = publish(repo, tmp_path, b"one", experience_index=0, metrics={"loss": 1.5})
    v2 = publish(repo, tmp_path, b"two", experience_index=1)
    assert (v1, v2) == (1, 2)
    root = tmp_path / "models" / "student"
    assert (root / "1" / "model.onnx").read_bytes() == b"one"
    config = (root / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "TYPE_UINT8" in config and "dims: [ 3 ]" in config
    m = repo.load_manifest(2)
    assert m["version"] == 2 and m["parent_version"] == 1 and m["class_names"] == CLASSES
    assert m["input"]["shape"] == [-1, 16, 16, 3] and m["input"]["dtype"] == "uint8"
    assert m["experience_index"] == 1 and m["sha256"] == sha256_file(root / "2" / "model.onnx")
    assert m["created_at"].endswith("+00:00")
    assert repo.load_manifest(1)["metrics"] == {"loss": 1.5}
    assert repo.verify(2) == m
    # No temp folders left behind.
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp")] == []


def test_partial_or_hidden_folders_are_not_versions(tmp_path):
    repo = ModelRepository(tmp_path, "student")
    publish(repo, tmp_path, b"good")
    model_dir = tmp_path / "student"
    (model_dir / ".tmp-9-abc").mkdir()
    (model_dir / ".tmp-9-abc" / "model.onnx").write_bytes(b"half")
    (model_dir / "7").mkdir()  # e.g. a hand copy cut short: no manifest
    (model_dir / "7" / "model.onnx").write_bytes(b"hal")
    assert repo.versions() == [1] and repo.latest_version() == 1
    # ... but the next number still steps over the stray folder, so a rename never collides.
    assert publish(repo, tmp_path, b"next") == 8


def test_corrupt_model_file_fails_verification(tmp_path):
    repo = ModelRepository(tmp_path, "student")
    v = publish(repo, tmp_path, b"original bytes")
    repo.model_path(v).write_bytes(b"flipped bytes!")
    with pytest.raises(CLAgentError, match="sha256"):
        repo.verify(v)


def test_versions_only_increase_across_restarts_and_retention(tmp_path):
    repo = ModelRepository(tmp_path, "student", keep_last=2)
    for i in range(5):
        publish(repo, tmp_path, b"m%d" % i)
    assert repo.versions() == [4, 5]
    # Delete the newest folders by hand as well: the persisted counter still remembers 5.
    import shutil

    shutil.rmtree(repo.version_dir(5))
    shutil.rmtree(repo.version_dir(4))
    again = ModelRepository(tmp_path, "student", keep_last=2)
    assert again.latest_version() is None
    assert publish(again, tmp_path, b"after restart") == 6


def test_a_failure_after_the_rename_leaves_the_version_published(tmp_path, monkeypatch, caplog):
    """Once a version's folder is renamed into place servers can load it: a failing fsync of the
    folder above, or an old version that cannot be removed, must not make publish report a failure."""
    import errno

    import cl_agent.repository as repository_module

    repo = ModelRepository(tmp_path, "student", keep_last=1)
    assert publish(repo, tmp_path, b"first") == 1
    real_fsync_dir, real_rename = repository_module.fsync_dir, os.rename

    def failing_fsync_dir(path):
        if os.fspath(path) == os.fspath(repo.model_dir):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    def failing_trash_rename(src, dst):
        if ".deleted-" in os.fspath(dst):
            raise PermissionError(errno.EACCES, "Permission denied")
        real_rename(src, dst)

    monkeypatch.setattr(repository_module, "fsync_dir", failing_fsync_dir)
    monkeypatch.setattr(os, "rename", failing_trash_rename)
    assert publish(repo, tmp_path, b"second") == 2
    assert repo.verify(2)["version"] == 2
    assert repo.versions() == [1, 2]  # version 1 could not be removed: kept, not lost
    assert "could not be fsynced" in caplog.text and "could not remove old versions" in caplog.text
    monkeypatch.undo()
    assert publish(repo, tmp_path, b"third") == 3
    assert repo.versions() == [3]  # the next publish's retention catches up


def test_rollback_republishes_old_model_as_new_version(tmp_path):
    repo = ModelRepository(tmp_path, "student", keep_last=10)
    publish(repo, tmp_path, b"v1 bytes", experience_index=0)
    publish(repo, tmp_path, b"v2 bytes", experience_index=1)
    v3 = repo.rollback(1)
    assert v3 == 3
    m = repo.load_manifest(3)
    assert m["rollback_of"] == 1 and m["parent_version"] == 2 and m["experience_index"] == 0
    assert repo.model_path(3).read_bytes() == b"v1 bytes" and m["sha256"] == repo.load_manifest(1)["sha256"]
    with pytest.raises(CLAgentError, match="no version 42"):
        repo.rollback(42)


def test_optimised_graph_is_published_hashed_and_carried_by_a_verified_rollback(tmp_path):
    repo = ModelRepository(tmp_path / "models", "student", keep_last=10)
    environment = {"onnxruntime": "1.0", "machine": "x86_64", "isa": ["avx2"]}
    optimized = OptimizedModel(fake_model(tmp_path, b"optimised one"), environment)
    v1 = repo.publish(fake_model(tmp_path, b"one"), {"class_names": CLASSES, "image_size": 16}, optimized)
    entry = repo.load_manifest(v1)["optimized"]
    assert entry == {"file": OPTIMIZED_FILE, "sha256": sha256_file(optimized.path), "environment": environment}
    assert (repo.version_dir(v1) / OPTIMIZED_FILE).read_bytes() == b"optimised one"
    # A manifest that names an optimised graph nobody published here does not keep the claim.
    v2 = publish(repo, tmp_path, b"two", optimized=entry)
    assert "optimized" not in repo.load_manifest(v2) and not (repo.version_dir(v2) / OPTIMIZED_FILE).exists()
    v3 = repo.rollback(v1)
    assert repo.load_manifest(v3)["optimized"] == entry
    assert (repo.version_dir(v3) / OPTIMIZED_FILE).read_bytes() == b"optimised one"
    # A damaged optimised graph is not carried over; the verified model.onnx still is.
    (repo.version_dir(v1) / OPTIMIZED_FILE).write_bytes(b"bit rot")
    v4 = repo.rollback(v1)
    assert "optimized" not in repo.load_manifest(v4) and repo.model_path(v4).read_bytes() == b"one"
    with pytest.raises(CLAgentError, match="optimised graph"):
        repo.publish(fake_model(tmp_path, b"x"), {"class_names": CLASSES, "image_size": 16}, OptimizedModel(tmp_path / "gone.onnx", {}))


def test_optimised_graph_with_a_weights_file_is_published_and_rolled_back_as_a_pair(tmp_path):
    repo = ModelRepository(tmp_path / "models", "student", keep_last=10)
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / OPTIMIZED_FILE).write_bytes(b"graph naming its weights")
    (folder / OPTIMIZED_DATA_FILE).write_bytes(b"weights")
    optimized = OptimizedModel(folder / OPTIMIZED_FILE, {"isa": []})
    v1 = repo.publish(fake_model(tmp_path, b"one"), {"class_names": CLASSES, "image_size": 16}, optimized)
    entry = repo.load_manifest(v1)["optimized"]
    assert entry["data_file"] == OPTIMIZED_DATA_FILE and entry["data_sha256"] == sha256_file(folder / OPTIMIZED_DATA_FILE)
    assert (repo.version_dir(v1) / OPTIMIZED_DATA_FILE).read_bytes() == b"weights"
    v2 = repo.rollback(v1)
    assert repo.load_manifest(v2)["optimized"] == entry and (repo.version_dir(v2) / OPTIMIZED_DATA_FILE).read_bytes() == b"weights"
    # Damaged weights: the pair is not carried over.
    (repo.version_dir(v1) / OPTIMIZED_DATA_FILE).write_bytes(b"bit rot")
    v3 = repo.rollback(v1)
    assert "optimized" not in repo.load_manifest(v3) and not (repo.version_dir(v3) / OPTIMIZED_DATA_FILE).exists()
    # The graph records its weights file's name: published under another name the pair would not open.
    renamed = folder / "other.onnx"
    (folder / OPTIMIZED_FILE).rename(renamed)
    renamed.with_name(renamed.name + ".data").write_bytes(b"weights")
    with pytest.raises(CLAgentError, match=f"must be named {OPTIMIZED_FILE}"):
        repo.publish(fake_model(tmp_path, b"x"), {"class_names": CLASSES, "image_size": 16}, OptimizedModel(renamed, {}))
    assert repo.versions() == [v1, v2, v3]


def test_manifest_must_name_classes_and_size(tmp_path):
    repo = ModelRepository(tmp_path, "student")
    with pytest.raises(CLAgentError, match="image_size"):
        repo.publish(fake_model(tmp_path, b"x"), {"class_names": CLASSES})
    with pytest.raises(CLAgentError, match="no such file"):
        repo.publish(tmp_path / "missing.onnx", {"class_names": CLASSES, "image_size": 16})
    assert repo.versions() == []


def test_announcer_publishes_model_version_and_sha(tmp_path):
    ctx = zmq.Context.instance()
    announcer = Announcer("tcp://127.0.0.1:*")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"student")
    sub.connect(announcer.endpoint)
    try:
        # PUB drops messages until the subscription has arrived: repeat until one gets through.
        for _ in range(100):
            announcer.announce("student", 4, "ab" * 32)
            if sub.poll(50):
                break
        body = parse_announcement(sub.recv_multipart())
        assert body == {"model": "student", "version": 4, "sha256": "ab" * 32}
    finally:
        sub.close(0)
        announcer.close()


def test_models_list_and_rollback_commands(tmp_path):
    runner = CliRunner()
    root = tmp_path / "models"
    root.mkdir()  # an existing, empty repository (a missing folder is an error naming --repo: test_cli_models.py)
    empty = runner.invoke(app, ["models", "list", "--repo", str(root), "--model", "student"])
    assert empty.exit_code == 1 and "no versions" in empty.output

    repo = ModelRepository(root, "student")
    publish(repo, tmp_path, b"a", experience_index=0)
    publish(repo, tmp_path, b"b", experience_index=1)
    listed = runner.invoke(app, ["models", "list", "--repo", str(root), "--model", "student"])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.output.splitlines()[1:]] == ["1", "2"]

    rolled = runner.invoke(app, ["models", "rollback", "--to", "1", "--repo", str(root), "--model", "student"])
    assert rolled.exit_code == 0, rolled.output
    assert "version 3" in rolled.output and repo.load_manifest(3)["rollback_of"] == 1

    # An endpoint someone else holds: the rollback stands, only the announcement is skipped.
    holder = Announcer("tcp://127.0.0.1:*")
    try:
        busy = runner.invoke(
            app, ["models", "rollback", "--to", "2", "--repo", str(root), "--model", "student", "--announce", holder.endpoint]
        )
    finally:
        holder.close()
    assert busy.exit_code == 0 and "not announced" in busy.output and repo.load_manifest(4)["rollback_of"] == 2

    bad = runner.invoke(app, ["models", "rollback", "--to", "9", "--repo", str(root), "--model", "student"])
    assert bad.exit_code != 0 and isinstance(bad.exception, CLAgentError) and "no version 9" in str(bad.exception)
    assert json.loads((root / "student" / "3" / "manifest.json").read_text())["version"] == 3


def test_models_show_prints_a_manifest_and_verify_finds_altered_or_missing_files(tmp_path):
    runner = CliRunner()
    root = tmp_path / "models"
    args = ["--repo", str(root), "--model", "student"]
    root.mkdir()
    nothing = runner.invoke(app, ["models", "verify", *args])
    assert nothing.exit_code != 0 and "no versions" in str(nothing.exception)

    repo = ModelRepository(root, "student")
    graph = fake_model(tmp_path, b"optimised graph")
    publish(repo, tmp_path, b"a", experience_index=0)
    repo.publish(fake_model(tmp_path, b"bb"), {"class_names": CLASSES, "image_size": 16}, OptimizedModel(graph, {"cpu": "x"}))
    publish(repo, tmp_path, b"ccc", experience_index=2, metrics={"loss": 0.5})

    newest = runner.invoke(app, ["models", "show", *args])
    assert newest.exit_code == 0, newest.output
    assert json.loads(newest.output) == repo.load_manifest(3)
    assert json.loads(runner.invoke(app, ["models", "show", "--version", "1", *args]).output)["experience_index"] == 0
    assert "no version 7" in str(runner.invoke(app, ["models", "show", "--version", "7", *args]).exception)

    clean = runner.invoke(app, ["models", "verify", *args])
    assert clean.exit_code == 0, clean.output
    assert clean.output.splitlines() == ["version 1: ok", "version 2: ok", "version 3: ok"]

    (root / "student" / "2" / OPTIMIZED_FILE).unlink()  # as on a follower, which installs model.onnx alone
    follower_like = runner.invoke(app, ["models", "verify", *args])
    assert follower_like.exit_code == 0, follower_like.output
    assert follower_like.output.splitlines()[1] == "version 2: ok (no optimised graph here (servers open model.onnx))"

    (root / "student" / "1" / "model.onnx").write_bytes(b"A")  # a byte changed on disk
    (root / "student" / "3" / "model.onnx").unlink()
    damaged = runner.invoke(app, ["models", "verify", *args])
    assert damaged.exit_code == 1
    lines = damaged.output.splitlines()
    assert lines[0].startswith("version 1: model.onnx: sha256") and "does not match" in lines[0]
    assert lines[2] == "version 3: model.onnx missing (not a version any more: servers skip this folder)"
    assert "2 of 3 versions" in damaged.output


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    import threading

    repo_root = tmp_path / "models"
    sources = [fake_model(tmp_path, b"model %d" % i) for i in range(4)]
    results: list[int] = []

    def publisher(source):
        repo = ModelRepository(repo_root, "student", keep_last=100)  # each its own instance, like separate processes
        for _ in range(3):
            results.append(repo.publish(source, {"class_names": CLASSES, "image_size": 16}))

    threads = [threading.Thread(target=publisher, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 13))
    assert ModelRepository(repo_root, "student").versions() == list(range(1, 13))


def test_a_paced_publish_sleeps_between_chunks_and_writes_out_as_it_goes(tmp_path, monkeypatch):
    import cl_agent.repository as repository

    data = np.random.default_rng(0).integers(0, 256, 5 * (1 << 20), dtype=np.uint8).tobytes()  # 5 MiB: 20 chunks
    source = tmp_path / "big.onnx"
    source.write_bytes(data)
    sleeps, writeouts = [], []
    monkeypatch.setattr(repository.time, "sleep", sleeps.append)
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(repository.os, "fdatasync", lambda fd: (writeouts.append(fd), real_fdatasync(fd)))
    paced = ModelRepository(tmp_path / "paced", "student", pause_s=0.001)
    v = paced.publish(source, {"class_names": CLASSES, "image_size": 16})
    assert paced.model_path(v).read_bytes() == data and paced.load_manifest(v)["sha256"] == sha256_file(source)
    chunks = len(data) // repository.CHUNK
    assert sleeps.count(0.001) == chunks and len(writeouts) == chunks // repository.WRITE_OUT_CHUNKS
    sleeps.clear(), writeouts.clear()
    full_speed = ModelRepository(tmp_path / "fast", "student", pause_s=0)
    full_speed.publish(source, {"class_names": CLASSES, "image_size": 16})
    assert sha256_file(source) == full_speed.load_manifest(1)["sha256"] and sleeps == [] and writeouts == []
    assert sha256_file(source, pause_s=0.002) == sha256_file(source) and sleeps.count(0.002) == chunks
    with pytest.raises(CLAgentError, match="pause_s"):
        ModelRepository(tmp_path, "student", pause_s=-1)


@pytest.mark.parametrize("garbage", [b"\xff\xfe not json", b'{"version": 2}', b"[1, 2]"])
def test_models_list_shows_an_unreadable_manifest_and_lists_the_others(tmp_path, garbage):
    root = tmp_path / "models"
    repo = ModelRepository(root, "student")
    for content in (b"a", b"b", b"c"):
        publish(repo, tmp_path, content)
    (root / "student" / "2" / "manifest.json").write_bytes(garbage)
    listed = CliRunner().invoke(app, ["models", "list", "--repo", str(root), "--model", "student"])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line for line in listed.output.splitlines()[1:] if line.split()[0].isdigit()}
    assert sorted(rows) == ["1", "2", "3"]
    assert "unreadable" in rows["2"] and "manifest" in rows["2"]
    assert "unreadable" not in rows["1"] + rows["3"]
    assert "warning" in listed.output and "version 2" in listed.output


def test_published_files_are_readable_by_other_users(tmp_path):
    old = os.umask(0o077)  # the modes are set explicitly, not left to the publisher's umask
    try:
        repo = ModelRepository(tmp_path / "models", "student")
        publish(repo, tmp_path, b"one")
        repo.rollback(1)
    finally:
        os.umask(old)
    model_dir = tmp_path / "models" / "student"
    for path in (model_dir / "config.pbtxt", model_dir / ".last_version", model_dir / "1" / "manifest.json",
                 model_dir / "1" / "model.onnx", model_dir / "2" / "manifest.json", model_dir / "2" / "model.onnx"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path
    for folder in (model_dir, model_dir / "1", model_dir / "2"):
        assert oct(folder.stat().st_mode & 0o777) == oct(0o755), folder


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "..", "a\\b", "x y", "a\nb", "é"])
def test_model_name_must_be_one_safe_path_component(tmp_path, name):
    with pytest.raises(CLAgentError) as info:
        ModelRepository(tmp_path, name)
    assert repr(name) in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "a/b", ".x", "x y"])
def test_config_rejects_an_unsafe_model_name(tmp_path, name):
    from cl_agent.config import ConfigError, load_config

    config = tmp_path / "agent.yaml"
    config.write_text(f"agent:\n  model_name: {json.dumps(name)}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert info.value.key == "agent.model_name" and repr(name) in str(info.value)


def test_safe_model_names_are_accepted(tmp_path):
    from cl_agent.config import load_config

    for name in ("student", "resnet-18_v2.1", "A9"):
        assert ModelRepository(tmp_path, name).model_name == name
    config = tmp_path / "agent.yaml"
    config.write_text("agent:\n  model_name: resnet-18_v2.1\n")
    assert load_config(config).agent.model_name == "resnet-18_v2.1"


def test_report_png_is_readable_by_other_users(tmp_path):
    from cl_agent.status import append_experience_record, write_report

    record = {"experience": 0, "labeled": 50, "unlabeled": 0, "merged": [0], "online_accuracy": 0.5, "online_correct": 25,
              "online_total": 50, "online_accuracy_per_class": {}, "losses": {"ce": 1.0}, "update_seconds": 1.0,
              "export_seconds": 0.1, "version": 1, "stopped_by_budget": False}
    append_experience_record(tmp_path, record)
    old = os.umask(0o077)
    try:
        write_report(tmp_path)
    finally:
        os.umask(old)
    assert oct((tmp_path / "report.png").stat().st_mode & 0o777) == oct(0o644)


def test_publish_after_a_remembered_version_steps_past_it(tmp_path):
    # The agent passes its own last version: a fresh (deleted or replaced) repository must not reuse numbers.
    repo = ModelRepository(tmp_path / "models", "student")
    assert repo.publish(fake_model(tmp_path, b"one"), {"class_names": CLASSES, "image_size": 16}, after=7) == 8
    assert repo.versions() == [8] and repo.load_manifest(8)["version"] == 8
    # `after` below the repository's own counter does not pull the number back.
    assert repo.publish(fake_model(tmp_path, b"two"), {"class_names": CLASSES, "image_size": 16}, after=3) == 9


def test_publish_removes_folders_an_interrupted_retention_left_and_nothing_else(tmp_path):
    repo = ModelRepository(tmp_path, "student")
    publish(repo, tmp_path, b"first")
    model_dir = tmp_path / "student"
    # a kill -9 during the delete, or a delete that failed part way (ignore_errors), leaves one of these
    left = model_dir / ".deleted-3-0123abcd"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "model.onnx").write_bytes(b"old")
    # a publisher killed before its rename leaves its temp folder (a few seconds old, not hours)
    killed = model_dir / ".tmp-2-89abcdef"
    killed.mkdir()
    (killed / "model.onnx").write_bytes(b"half")
    others = [model_dir / ".deleted-by-hand", model_dir / "deleted-3-0123abcd", model_dir / ".tmp-mine"]  # names never made here
    for folder in others:
        folder.mkdir()
    publish(repo, tmp_path, b"second")
    assert not left.exists() and not killed.exists()
    assert all(folder.is_dir() for folder in others)
    assert repo.versions() == [1, 2]
