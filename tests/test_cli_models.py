"""`cl-agent models ...` as an operator types them: a bad --repo is one clear line and exit 2 in every subcommand."""

from __future__ import annotations

import sys

import pytest

from test_repository import publish

from cl_agent.cli import main
from cl_agent.repository import ModelRepository

SUBCOMMANDS = [["list"], ["show"], ["verify"], ["rollback", "--to", "1"]]


def cl_agent(monkeypatch, capsys, *words: str) -> tuple[int, str, str]:
    """Run the console entry point in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["cl-agent", *words])
    with pytest.raises(SystemExit) as stopped:
        main()
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


@pytest.mark.parametrize("subcommand", SUBCOMMANDS, ids=lambda words: words[0])
def test_a_missing_repo_folder_is_named_with_exit_2(tmp_path, monkeypatch, capsys, subcommand):
    missing = tmp_path / "nosuch"
    code, out, err = cl_agent(monkeypatch, capsys, "models", *subcommand, "--repo", str(missing))
    assert code == 2 and out == ""
    assert err.strip() == f"error: --repo = {str(missing)!r}: folder not found"
    assert not missing.exists()  # nothing made on the way (rollback publishes nothing)


@pytest.mark.parametrize("subcommand", SUBCOMMANDS, ids=lambda words: words[0])
def test_a_repo_that_is_a_file_is_named_with_exit_2(tmp_path, monkeypatch, capsys, subcommand):
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    code, out, err = cl_agent(monkeypatch, capsys, "models", *subcommand, "--repo", str(a_file))
    assert code == 2 and out == ""
    assert err.strip() == f"error: --repo = {str(a_file)!r}: not a folder"


def test_an_existing_empty_repository_keeps_its_messages(tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    root.mkdir()
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "list", "--repo", str(root))
    assert code == 1 and out.strip() == f"no versions of 'student' in {root}"
    code, _, err = cl_agent(monkeypatch, capsys, "models", "show", "--repo", str(root))
    assert code == 2 and "no versions of 'student'" in err
    publish(ModelRepository(root, "student"), tmp_path, b"a")
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "list", "--repo", str(root))
    assert code == 0 and out.splitlines()[1].split()[0] == "1"


@pytest.mark.parametrize("endpoint", ["notanendpoint", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", ""])
def test_a_malformed_announce_endpoint_is_refused_before_anything_is_published(tmp_path, monkeypatch, capsys, endpoint):
    root = tmp_path / "models"
    repository = ModelRepository(root, "student")
    publish(repository, tmp_path, b"a")
    publish(repository, tmp_path, b"b")
    code, out, err = cl_agent(monkeypatch, capsys, "models", "rollback", "--to", "1", "--repo", str(root), "--announce", endpoint)
    assert code == 2 and out == "", out
    assert err.startswith(f"error: --announce = {endpoint!r}: ") and len(err.strip().splitlines()) == 1
    assert repository.versions() == [1, 2] and repository.last_version_ever() == 2  # nothing published


# --------------------------------------------------------------------------- hold, release, --config


def test_hold_list_and_release_through_the_command_line(tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    repository = ModelRepository(root, "student")
    publish(repository, tmp_path, b"a")
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "hold", "--repo", str(root), "--model", "student", "--reason", "arm drops cups")
    assert code == 0 and "held" in out and repository.publishing_hold().reason == "arm drops cups"
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "list", "--repo", str(root))
    hold_line = out.strip().splitlines()[-1]
    assert code == 0 and hold_line.startswith("publishing held since ") and ": arm drops cups (" in hold_line
    assert f"`cl-agent models release --repo {root} --model student` to resume" in hold_line
    assert repository.publishing_hold().held_by in hold_line
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "release", "--repo", str(root))
    assert code == 0 and "released" in out and repository.publishing_hold() is None
    assert "publishes the checkpoint the hold kept back within about a second" in out and "next update publishes" in out
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "release", "--repo", str(root))
    assert code == 1 and "was not held" in out
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "list", "--repo", str(root))
    assert "held" not in out


def test_a_hold_on_a_mistyped_model_is_refused(tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    publish(ModelRepository(root, "student"), tmp_path, b"a")
    code, out, err = cl_agent(monkeypatch, capsys, "models", "hold", "--repo", str(root), "--model", "studnet")
    assert code == 2 and out == "" and "no model 'studnet'" in err and "models there: student" in err
    assert not (root / "studnet").exists()


def test_reason_without_hold_is_refused_before_anything_is_published(tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    repository = ModelRepository(root, "student")
    publish(repository, tmp_path, b"a")
    code, _, err = cl_agent(monkeypatch, capsys, "models", "rollback", "--to", "1", "--repo", str(root), "--reason", "x")
    assert code == 2 and "--reason goes with --hold" in err and repository.versions() == [1]


def test_models_and_labels_commands_take_the_repository_from_the_config_and_options_win(tmp_path, monkeypatch, capsys):
    import yaml

    root = tmp_path / "models"
    publish(ModelRepository(root, "arm"), tmp_path, b"a")
    publish(ModelRepository(root, "other"), tmp_path, b"b")
    workdir = tmp_path / "agent"
    workdir.mkdir()
    config = tmp_path / "robot.yaml"
    config.write_text(yaml.safe_dump({"agent": {"workdir": str(workdir), "model_name": "arm"}, "repository": {"root": str(root)}}))
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "hold", "--config", str(config))
    assert code == 0 and ModelRepository(root, "arm").publishing_hold() is not None
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "list", "--config", str(config))
    assert code == 0 and "publishing held" in out and "--model arm" in out
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "list", "--config", str(config), "--model", "other")
    assert code == 0 and "held" not in out  # --model wins
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "show", "-c", str(config), "--set", "agent.model_name=other")
    assert code == 0 and '"model": "other"' in out
    code, _, _ = cl_agent(monkeypatch, capsys, "models", "verify", "--config", str(config))
    assert code == 0
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "release", "--config", str(config))
    assert code == 0 and ModelRepository(root, "arm").publishing_hold() is None
    code, out, _ = cl_agent(monkeypatch, capsys, "labels", "restore", "--config", str(config))
    assert code == 0 and (workdir / "labels.json").is_file()
    # A root from the config that is not there is named as the config key, not as --repo.
    code, out, err = cl_agent(monkeypatch, capsys, "models", "list", "--config", str(config), "--set", f"repository.root={tmp_path / 'nosuch'}")
    assert code == 2 and err.strip() == f"error: repository.root = {str(tmp_path / 'nosuch')!r}: folder not found"
    code, out, err = cl_agent(monkeypatch, capsys, "models", "list", "--config", str(config), "--repo", str(tmp_path / "typo"))
    assert code == 2 and err.strip() == f"error: --repo = {str(tmp_path / 'typo')!r}: folder not found"
    # Neither --repo nor a config: the default root is named as such, with the two ways to point elsewhere.
    monkeypatch.chdir(tmp_path)
    code, out, err = cl_agent(monkeypatch, capsys, "models", "release")
    assert code == 2 and err.strip() == ("error: the default repository.root (no --repo or --config given) = 'runs/models': "
                                         "folder not found: pass --repo DIR (the agent's repository.root) or --config FILE (the agent's config)")


# --------------------------------------------------------------------------- a mistyped --model, a second hold


@pytest.mark.parametrize(
    "subcommand", [["rollback", "--to", "1"], ["rollback", "--to", "1", "--hold"], ["show"], ["verify"], ["list"], ["release"], ["hold"]],
    ids=lambda words: "-".join(w.strip("-") for w in words if not w.isdigit()),
)
def test_a_mistyped_model_makes_nothing_and_is_named_beside_the_models_there(tmp_path, monkeypatch, capsys, subcommand):
    root = tmp_path / "models"
    publish(ModelRepository(root, "student"), tmp_path, b"a")
    code, out, err = cl_agent(monkeypatch, capsys, "models", *subcommand, "--repo", str(root), "--model", "studnet")
    assert sorted(p.name for p in root.iterdir()) == ["student"]  # no folder, lock or hold file for 'studnet'
    assert code != 0 and "models there: student" in out + err, (out, err)


def test_a_folder_that_holds_no_versions_is_not_a_model_to_hold(tmp_path, monkeypatch, capsys):
    """What a mistyped command used to leave (a folder with a lock file) must not make a hold on nothing succeed."""
    root = tmp_path / "models"
    publish(ModelRepository(root, "student"), tmp_path, b"a")
    (root / "studnet").mkdir()
    (root / "studnet" / ".publish.lock").touch()
    code, out, err = cl_agent(monkeypatch, capsys, "models", "hold", "--repo", str(root), "--model", "studnet")
    assert code == 2 and out == "" and "no model 'studnet'" in err and "(models there: student)" in err
    assert ModelRepository(root, "studnet").publishing_hold() is None
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "list", "--repo", str(root), "--model", "studnet")
    assert code == 1 and out.strip() == f"no versions of 'studnet' in {root} (models there: student)"


def test_a_second_hold_keeps_the_first_and_reports_it_unless_replace(tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    repository = ModelRepository(root, "student")
    publish(repository, tmp_path, b"a")
    code, _, _ = cl_agent(monkeypatch, capsys, "models", "hold", "--repo", str(root), "--reason", "arm drops cups")
    first = repository.publishing_hold()
    assert code == 0 and first.reason == "arm drops cups"
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "hold", "--repo", str(root), "--reason", "again")
    assert code == 0 and repository.publishing_hold() == first  # who, when and why of the first hold stand
    assert f"was already held since {first.held_at} by {first.held_by}: arm drops cups" in out and "--replace" in out
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "hold", "--repo", str(root), "--reason", "again", "--replace")
    assert code == 0 and repository.publishing_hold().reason == "again"
    assert f"replaced the hold on 'student' that was held since {first.held_at} by {first.held_by}: arm drops cups" in out


def test_rollback_hold_keeps_a_hold_already_there(tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    repository = ModelRepository(root, "student")
    publish(repository, tmp_path, b"a")
    publish(repository, tmp_path, b"b")
    repository.hold("arm drops cups")
    first = repository.publishing_hold()
    code, out, _ = cl_agent(monkeypatch, capsys, "models", "rollback", "--to", "1", "--hold", "--repo", str(root), "--reason", "x")
    assert code == 0 and repository.versions() == [1, 2, 3] and repository.publishing_hold() == first
    assert "publishing stays held since" in out and "arm drops cups (it was held before the rollback; that hold is kept)" in out


def test_the_manifest_of_a_rollback_says_whether_it_was_announced(tmp_path, monkeypatch, capsys):
    from ingest_support import free_port

    from cl_agent.repository import Announcer

    root = tmp_path / "models"
    repository = ModelRepository(root, "student")
    publish(repository, tmp_path, b"a")
    taken = Announcer(f"tcp://127.0.0.1:{free_port()}")  # the running agent's announce socket
    try:
        code, out, err = cl_agent(monkeypatch, capsys, "models", "rollback", "--to", "1", "--repo", str(root), "--announce", taken.endpoint)
    finally:
        taken.close()
    assert code == 0 and "published as version 2" in out and "warning: not announced" in err
    assert repository.load_manifest(2)["announced"] is False
    code, _, err = cl_agent(monkeypatch, capsys, "models", "rollback", "--to", "2", "--repo", str(root),
                            "--announce", f"tcp://127.0.0.1:{free_port()}")
    assert code == 0 and err == "" and repository.load_manifest(3)["announced"] is True  # not carried over from version 2
    code, _, _ = cl_agent(monkeypatch, capsys, "models", "rollback", "--to", "1", "--repo", str(root))
    assert code == 0 and repository.load_manifest(4)["announced"] is False  # nothing announces it
