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
