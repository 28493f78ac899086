"""What the agent and `cl-agent status` say about what they do not know: the served version without a hosted
server, an update interrupted by a kill, an update recovered from its checkpoint; and a report legend that
covers no line."""

import logging
import queue
import signal
import subprocess
import sys

from cl_agent.agent import Agent
from cl_agent.config import load_config
from cl_agent.metrics import AgentMetrics
from cl_agent.status import (
    CHECKPOINTING,
    EXPORTING,
    TRAINING,
    _report_figure,
    initial_state,
    print_status,
    read_state,
    write_state,
)


def status_rows(workdir, capsys) -> dict[str, str]:
    print_status(workdir)
    out = capsys.readouterr().out
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith(" "))}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------- the served version


def test_metrics_without_a_hosted_server_export_no_served_version():
    untracked = AgentMetrics(served_version=False)
    untracked.set_served_version(3)  # ignored: nothing to set
    assert untracked.value("served_version") is None
    assert "cl_agent_served_version" not in untracked.render().decode()
    hosted = AgentMetrics()
    assert hosted.value("served_version") == 0  # until the hosted server answers
    hosted.set_served_version(3)
    assert hosted.value("served_version") == 3


def test_an_agent_without_a_hosted_server_exports_no_served_version_and_records_why(tmp_path):
    cfg = load_config(None, {"agent.workdir": str(tmp_path / "work"), "repository.root": str(tmp_path / "repo"),
                             "agent.host_server": False, "metrics.enabled": False,
                             **{f"ingest.{k}": "tcp://127.0.0.1:*" for k in ("labeled_endpoint", "frame_endpoint",
                                                                             "control_endpoint")}})
    agent = Agent(cfg)
    agent.stop_requested.set()  # stopped during the start-up: it starts no children, and writes its final state
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert agent.run() == 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert agent.metrics.value("served_version") is None
    assert "cl_agent_served_version" not in agent.metrics.render().decode()
    state = read_state(tmp_path / "work")
    assert state["host_server"] is False and state["served_version"] is None


def test_status_says_the_served_version_is_not_tracked_without_a_hosted_server(tmp_path, capsys):
    write_state(tmp_path, initial_state() | {"host_server": False, "published_version": 4})
    served = status_rows(tmp_path, capsys)["served version"]
    assert served.startswith("not tracked by this agent (agent.host_server: false)")
    assert "cl-agent predict --status --endpoint" in served
    write_state(tmp_path, initial_state() | {"host_server": True, "served_version": 4})
    assert status_rows(tmp_path, capsys)["served version"] == "4"
    write_state(tmp_path, initial_state())  # an older agent's state.json: as before
    assert status_rows(tmp_path, capsys)["served version"] == "none"


# --------------------------------------------------------------------------- an update cut by a kill


def test_an_update_of_an_agent_killed_mid_training_shows_as_interrupted_without_a_time_left(tmp_path, capsys):
    update = {"experience": 2, "phase": TRAINING, "step": 12, "steps": 160, "elapsed_s": 9.0, "eta_s": 81.0,
              "phase_elapsed_s": 9.0}
    write_state(tmp_path, initial_state() | {"pid": dead_pid(), "update": update})
    rows = status_rows(tmp_path, capsys)
    assert rows["agent"].startswith("not running")
    assert rows["update"] == "experience 2 interrupted at step 12/160 (training); redone on restart"
    write_state(tmp_path, initial_state() | {"pid": dead_pid(), "update": update | {"phase": EXPORTING, "step": 160}})
    assert status_rows(tmp_path, capsys)["update"] == (
        "experience 2 interrupted at step 160/160 (exporting); its checkpoint is published on restart, not retrained")
    write_state(tmp_path, initial_state() | {"pid": dead_pid(), "update": update | {"phase": CHECKPOINTING}})
    assert "redone on restart unless its checkpoint was saved" in status_rows(tmp_path, capsys)["update"]
    write_state(tmp_path, initial_state() | {"update": update})  # this process: alive, as before
    assert status_rows(tmp_path, capsys)["update"].endswith("about 1m21s left")


# --------------------------------------------------------------------------- a recovered update's log line


def test_a_recovered_update_is_logged_as_recovered_not_as_trained_in_0_s(tmp_path, caplog):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path / "w"), "repository.root": str(tmp_path / "r")}))
    agent.results = queue.Queue()
    agent.results.put({
        "experience": 7, "labeled": 80, "unlabeled": 100, "merged": [7], "online_accuracy": None, "online_correct": 0,
        "online_total": 0, "online_accuracy_per_class": {}, "losses": {}, "update_seconds": 0.0, "export_seconds": 0.0,
        "version": 3, "stopped_by_budget": False, "recovered": True,
    })
    with caplog.at_level(logging.INFO, logger="cl_agent.agent"):
        agent._drain_results(initial_state(), AgentMetrics(), None)
    assert "experience 7 recovered from its checkpoint (trained before the restart; its timings, losses and " \
           "online accuracy were not recorded)" in caplog.text
    assert "published version 3" in caplog.text
    assert "trained (80 labeled" not in caplog.text and "0.0 s" not in caplog.text


# --------------------------------------------------------------------------- report.png


def test_the_report_legends_cover_no_plotted_area():
    records = [{"experience": e, "online_accuracy": a, "online_correct": int(50 * a), "online_total": 50,
                "losses": {"total": 1.0 / (e + 1), "ce": 0.5, "kd_feature": 0.1, "ssl": 0.2}}
               for e, a in enumerate([0.1, 0.3, 0.5, 0.2, 0.15, 0.1])]  # low values: where a lower-right legend sat
    figure = _report_figure(records, "run: 6 updates")
    renderer = figure.canvas.get_renderer()
    figure.canvas.draw()
    for axes in figure.axes:
        legend = axes.get_legend()
        assert legend is not None
        box, plot = legend.get_window_extent(renderer), axes.get_window_extent(renderer)
        assert not box.overlaps(plot), f"the legend of {axes.get_ylabel()!r} lies over its plot"
        assert figure.bbox.contains(box.x1 - 1, box.y0 + 1)  # and inside the picture
