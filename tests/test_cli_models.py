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
