"""`cl-agent status` and `cl-agent report` find the workdir from --config (agent.workdir); --workdir wins;
a missing folder names both options."""

import pytest
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.status import append_experience_record, initial_state, write_state
from test_status import PNG_SIGNATURE, record


@pytest.fixture
def agent_dir(tmp_path):
    workdir = tmp_path / "robot-agent"
    state = initial_state(metrics_port=9109)
    state.update(last_experience=1, model_version=2)
    write_state(workdir, state)
    for e, correct in enumerate([10, 20]):
        append_experience_record(workdir, record(e, correct))
    return workdir


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_status_and_report_read_the_workdir_from_the_config(agent_dir, tmp_path):
    config = tmp_path / "robot.yaml"
    config.write_text(f"agent:\n  workdir: {agent_dir}\n")
    status = invoke("status", "--config", config)
    assert status.exit_code == 0, status.output
    assert str(agent_dir) in status.output and "last experience" in status.output
    report = invoke("report", "-c", config)
    assert report.exit_code == 0, report.output
    assert (agent_dir / "report.png").read_bytes().startswith(PNG_SIGNATURE)
    by_set = invoke("status", "--set", f"agent.workdir={agent_dir}")
    assert by_set.exit_code == 0 and str(agent_dir) in by_set.output


def test_an_explicit_workdir_wins_over_the_config(agent_dir, tmp_path):
    config = tmp_path / "robot.yaml"
    config.write_text(f"agent:\n  workdir: {tmp_path / 'elsewhere'}\n")
    result = invoke("status", "--config", config, "--workdir", agent_dir)
    assert result.exit_code == 0, result.output
    assert str(agent_dir) in result.output


def test_a_missing_workdir_says_where_it_came_from_and_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/agent (the default) is not there
    for command in ("status", "report"):
        bare = invoke(command)
        assert bare.exit_code == 2
        assert "no agent working directory at runs/agent (the default; folder not found)" in bare.output
        assert "--workdir DIR" in bare.output and "--config FILE" in bare.output
    config = tmp_path / "robot.yaml"
    config.write_text(f"agent:\n  workdir: {tmp_path / 'gone'}\n")
    configured = invoke("status", "--config", config)
    assert configured.exit_code == 2 and f"({'agent.workdir of ' + str(config)}; folder not found)" in configured.output
    bad = invoke("status", "--config", tmp_path / "none.yaml")
    assert bad.exit_code != 0 and "none.yaml" in f"{bad.output}{bad.exception}"
