"""A working directory that cannot be used is refused with one clear line, before anything starts."""

import pytest

from cl_agent.agent import run_agent
from cl_agent.config import load_config
from cl_agent.errors import CLAgentError
from cl_agent.ingest import run_ingest


@pytest.mark.parametrize("run", [run_agent, run_ingest])
def test_a_workdir_that_is_a_file_is_a_clear_error(tmp_path, run):
    not_a_folder = tmp_path / "state"
    not_a_folder.write_text("x")
    cfg = load_config(None, {"agent.workdir": str(not_a_folder), "metrics.enabled": False})
    with pytest.raises(CLAgentError, match="agent.workdir = .*state.*not a folder"):
        run(cfg)


@pytest.mark.parametrize("run", [run_agent, run_ingest])
def test_a_workdir_under_a_file_is_a_clear_error(tmp_path, run):
    (tmp_path / "file").write_text("x")
    cfg = load_config(None, {"agent.workdir": str(tmp_path / "file" / "work"), "metrics.enabled": False})
    with pytest.raises(CLAgentError, match="agent.workdir = .*cannot create the folder"):
        run(cfg)


def test_a_repository_root_that_is_a_file_is_refused_before_the_agent_starts(tmp_path):
    # found only at the first publish otherwise, and then on every trainer restart
    (tmp_path / "models").write_text("x")
    cfg = load_config(None, {"agent.workdir": str(tmp_path / "work"), "repository.root": str(tmp_path / "models"),
                             "metrics.enabled": False})
    with pytest.raises(CLAgentError, match="repository.root = .*models.*not a folder"):
        run_agent(cfg)
