"""The workdir status files and the `cl-agent status` / `cl-agent report` commands."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.status import (
    EXPERIENCES_FILE,
    STATE_FILE,
    append_experience_record,
    initial_state,
    online_summary,
    read_experience_records,
    read_state,
    recorded_since,
    records_backwards,
    write_state,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(experience: int, correct: int, total: int = 50, **overrides) -> dict:
    base = {
        "experience": experience,
        "labeled": total,
        "unlabeled": 100,
        "merged": [experience],
        "online_accuracy": correct / total if total else None,
        "online_correct": correct,
        "online_total": total,
        "online_accuracy_per_class": {"cat": 0.5, "dog": 0.25},
        "losses": {"ce": 1.0 / (experience + 1), "mlkd": 0.1, "ssl": 0.3},
        "update_seconds": 4.2,
        "export_seconds": 0.6,
        "version": experience + 1,
        "stopped_by_budget": False,
    }
    return base | overrides


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def workdir(tmp_path):
    """A workdir as a running agent leaves it: state.json and three trained experiences."""
    state = initial_state(metrics_port=9109)
    state.update(last_experience=2, pending_experiences=1, model_version=3, served_version=2,
                 counters={"accepted": {"labeled": 150, "frame": 900}, "rejected": {"bad_json": 2}, "dropped": 7})
    write_state(tmp_path, state)
    for e, correct in enumerate([10, 20, 30]):
        append_experience_record(tmp_path, record(e, correct))
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_state_round_trip_and_heartbeat_stamp(tmp_path):
    state = initial_state()
    state["updated_at"] = "2000-01-01T00:00:00.000Z"
    write_state(tmp_path, state)
    back = read_state(tmp_path)
    assert back["pid"] == os.getpid() and back["status"] == "running"
    assert back["updated_at"] > "2000-01-02"  # write_state stamps the current time
    assert not [p.name for p in tmp_path.iterdir() if p.name != STATE_FILE]  # no temp files left


def test_write_state_refuses_incomplete_state(tmp_path):
    state = initial_state()
    del state["pending_experiences"]
    with pytest.raises(ValueError, match="pending_experiences"):
        write_state(tmp_path, state)
    with pytest.raises(ValueError, match="'paused'"):
        write_state(tmp_path, initial_state() | {"status": "paused"})


def test_experience_records_append_read_and_nan(tmp_path):
    append_experience_record(tmp_path, record(0, 5, losses={"ce": float("nan")}))
    append_experience_record(tmp_path, record(1, 7))
    records = read_experience_records(tmp_path)
    assert [r["experience"] for r in records] == [0, 1]
    assert records[0]["losses"]["ce"] is None  # strict JSON: NaN is written as null
    assert records[0]["time"].endswith("Z")
    assert online_summary(records) == {"correct": 12, "total": 100, "accuracy": 0.12}
    with pytest.raises(ValueError, match="online_total"):
        append_experience_record(tmp_path, {k: v for k, v in record(2, 1).items() if k != "online_total"})


def test_torn_last_line_is_tolerated_and_next_append_starts_fresh(workdir):
    path = workdir / EXPERIENCES_FILE
    with path.open("ab") as f:
        f.write(b'{"experience": 3, "time": "2026-01-0')  # a crash in the middle of a write
    assert [r["experience"] for r in read_experience_records(workdir)] == [0, 1, 2]

    result = invoke("status", "--workdir", workdir)
    assert result.exit_code == 0, result.output
    assert "experience 2" in result.output

    append_experience_record(workdir, record(3, 40))
    assert [r["experience"] for r in read_experience_records(workdir)] == [0, 1, 2, 3]


def test_records_read_backwards_match_the_file_across_blocks_and_torn_lines(tmp_path):
    for e in range(40):
        append_experience_record(tmp_path, record(e, e % 50, merged=[e] if e % 7 else [e - 1, e] if e else [0]))
    with (tmp_path / EXPERIENCES_FILE).open("ab") as f:
        f.write(b'{"experience": 40, "tim')  # torn by a crash
    forwards = read_experience_records(tmp_path)
    for block in (7, 64, 1 << 16):  # blocks shorter than a line, a few lines, the whole file
        assert list(records_backwards(tmp_path, block_bytes=block)) == forwards[::-1]
    assert next(records_backwards(tmp_path / "absent"), None) is None


def test_recorded_since_reads_only_the_newest_records(tmp_path, monkeypatch):
    for e in range(30):
        append_experience_record(tmp_path, record(e, 5))
    append_experience_record(tmp_path, record(30, 5, merged=[30, 31]))
    assert recorded_since(tmp_path, 29) == {29, 30, 31}
    assert recorded_since(tmp_path, 32) == set()
    assert recorded_since(tmp_path, 0) == set(range(32))
    # Older lines are never reached once a record below the start is found: damage there goes unread.
    path = tmp_path / EXPERIENCES_FILE
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([b"not json"] * 25 + lines[25:]))
    seen = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda raw, *a, **k: seen.append(raw) or real(raw, *a, **k))
    assert recorded_since(tmp_path, 28) == {28, 29, 30, 31}
    assert len(seen) == 4  # the records of 30-31, 29 and 28, and the one below (27) that ends the search


def test_status_of_a_running_agent(workdir):
    result = invoke("status", "--workdir", workdir)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"running (pid {os.getpid()}" in out
    assert "last experience: 2" in " ".join(out.split())  # the labels are padded to one width
    assert "pending:" in out and "1 experience(s) waiting" in out
    rows = dict(line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith(" "))
    assert rows["published version"].strip() == "3" and rows["served version"].strip() == "2"
    assert rows["last trained version"].strip() == "3"  # the newest record's version
    assert "cumulative 0.400 (60/150)" in out  # (10 + 20 + 30) / 150
    assert "last 0.600 (30/50)" in out
    assert "accepted.labeled = 150" in out and "rejected.bad_json = 2" in out
    assert "http://127.0.0.1:9109/metrics" in out


def test_status_of_a_stopped_and_of_a_crashed_agent(workdir):
    state = read_state(workdir) | {"pid": dead_pid(), "status": "stopped"}
    write_state(workdir, state)
    result = invoke("status", "--workdir", workdir)
    assert result.exit_code == 0, result.output
    assert "stopped" in result.output and "running (" not in result.output

    write_state(workdir, state | {"status": "running"})  # it claimed to run, but its process is gone
    result = invoke("status", "--workdir", workdir)
    assert result.exit_code == 0, result.output
    assert f"not running: pid {state['pid']} is gone" in result.output


def test_status_flags_a_stale_heartbeat(workdir):
    state = read_state(workdir)
    state["started_at"] = "2020-01-01T00:00:00.000Z"
    write_state(workdir, state)
    raw = json.loads((workdir / STATE_FILE).read_text())
    raw["updated_at"] = "2020-01-01T00:00:00.000Z"  # edited behind write_state's back
    (workdir / STATE_FILE).write_text(json.dumps(raw))
    result = invoke("status", "--workdir", workdir)
    assert result.exit_code == 0, result.output
    assert "busy or stuck?" in result.output


def test_status_and_report_on_an_empty_workdir_fail_readably(tmp_path):
    for command in ("status", "report"):
        result = invoke(command, "--workdir", tmp_path)
        assert result.exit_code != 0
        assert "Traceback" not in result.output
        assert str(tmp_path) in result.output
    assert "no agent state" in invoke("status", "--workdir", tmp_path).output
    assert "nothing to report" in invoke("report", "--workdir", tmp_path).output
    assert "folder not found" in invoke("status", "--workdir", tmp_path / "missing").output


def test_unreadable_state_is_a_clear_error(tmp_path):
    (tmp_path / STATE_FILE).write_text("{not json")
    result = invoke("status", "--workdir", tmp_path)
    assert result.exit_code != 0 and STATE_FILE in result.output


def test_report_writes_a_png(workdir, tmp_path):
    result = invoke("report", "--workdir", workdir)
    assert result.exit_code == 0, result.output
    default = workdir / "report.png"
    assert str(default) in result.output
    data = default.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000

    out = tmp_path / "plots" / "custom.png"
    append_experience_record(workdir, record(3, 0, total=0, online_accuracy=None, losses={"ce": 0.2}))
    result = invoke("report", "--workdir", workdir, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    "damage",
    [
        {"losses": "x"},
        {"losses": ["ce", 1.0]},
        {"losses": {"ce": "high"}},
        {"online_accuracy": "good"},
        {"online_correct": "many"},
        {"online_total": [1]},
        {"experience": "third"},
    ],
)
def test_status_and_report_skip_a_hand_damaged_record(workdir, damage):
    append_experience_record(workdir, record(3, 40) | damage)
    append_experience_record(workdir, record(4, 45))
    field = next(iter(damage))
    for command in ("status", "report"):
        result = invoke(command, "--workdir", workdir)
        assert result.exit_code == 0, result.output
        assert result.exception is None
        assert "skipping" in result.output and "line 4" in result.output and repr(field) in result.output
    assert (workdir / "report.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "last experience: 2" in " ".join(invoke("status", "--workdir", workdir).output.split())
    assert "cumulative 0.525 (105/200)" in invoke("status", "--workdir", workdir).output  # 10+20+30+45 of 4 records


def test_report_with_only_damaged_records_fails_readably(tmp_path):
    append_experience_record(tmp_path, record(0, 5, losses="x"))
    result = invoke("report", "--workdir", tmp_path)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "nothing to report" in result.output and "malformed" in result.output


def test_status_and_report_on_a_file_say_it_is_not_a_folder(tmp_path):
    path = tmp_path / "state.txt"
    path.write_text("x")
    for command in ("status", "report"):
        result = invoke(command, "--workdir", path)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
        assert "not a folder" in result.output and str(path) in result.output


def test_status_says_when_the_last_update_was_held_from_publishing(workdir, tmp_path_factory):
    from cl_agent.repository import ModelRepository

    repository = ModelRepository(tmp_path_factory.mktemp("models"), "student")
    repository.model_dir.mkdir(parents=True)
    repository.hold_path.write_text('{"held_by": "ops@robot", "held_at": "2026-11-25T04:40:00+00:00", "reason": "drops cups"}')
    write_state(workdir, read_state(workdir) | {"model_repository": {"root": str(repository.root), "model": "student"}})
    append_experience_record(workdir, record(3, 40, version=None, held=True))
    result = invoke("status", "--workdir", workdir)
    assert result.exit_code == 0, result.output
    rows = dict(line.split(":", 1) for line in result.output.splitlines() if ":" in line and not line.startswith(" "))
    assert "experience 3 trained and checkpointed, not published" in rows["publishing held"]
    assert "drops cups" in rows["publishing held"] and f"--repo {repository.root} --model student" in rows["publishing held"]
    assert rows["last trained version"].strip() == "3"  # the held update published nothing
