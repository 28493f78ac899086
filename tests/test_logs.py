"""setup_logging: plain text and JSON lines, extra fields, the log file, idempotence."""

import io
import json
import logging

import pytest

from cl_agent.errors import CLAgentError
from cl_agent.logs import setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    level = root.level
    yield
    for handler in list(root.handlers):
        if getattr(handler, "_cl_agent", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_json_lines_to_stream_and_file(tmp_path):
    stream = io.StringIO()
    log_file = tmp_path / "work" / "agent.log"
    setup_logging("info", json_lines=True, file=log_file, stream=stream)
    log = logging.getLogger("cl_agent.test")

    log.debug("hidden below info")
    log.info("experience trained", extra={"experience": 3, "seconds": 41.5, "path": tmp_path})
    try:
        raise ValueError("bad value 7")
    except ValueError:
        log.exception("update failed", extra={"experience": 4})

    for text in (stream.getvalue(), log_file.read_text()):
        lines = text.splitlines()
        assert len(lines) == 2  # the debug record is filtered, the traceback stays inside its line
        first, second = (json.loads(line) for line in lines)
        assert first["level"] == "info"
        assert first["logger"] == "cl_agent.test"
        assert first["message"] == "experience trained"
        assert first["experience"] == 3 and first["seconds"] == 41.5
        assert first["path"] == str(tmp_path)
        assert first["time"].endswith("Z") and "T" in first["time"]
        assert second["level"] == "error" and second["experience"] == 4
        assert "ValueError: bad value 7" in second["exception"]


def test_plain_text_with_extra_fields():
    stream = io.StringIO()
    setup_logging("debug", json_lines=False, stream=stream)
    logging.getLogger("cl_agent.agent").debug("cut experience %d", 2, extra={"labeled": 500})
    line = stream.getvalue().strip()
    assert " DEBUG cl_agent.agent: cut experience 2 labeled=500" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_calling_again_replaces_its_handlers(tmp_path):
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", json_lines=False, stream=first)
    setup_logging("warning", json_lines=True, stream=second)
    log = logging.getLogger("cl_agent.test")
    log.info("dropped: below warning")
    log.warning("kept")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["kept"]


def test_unknown_level_is_refused():
    with pytest.raises(CLAgentError, match="'verbose'"):
        setup_logging("verbose", json_lines=False)


def test_the_log_file_is_rotated_past_its_size_and_only_the_set_number_of_old_files_is_kept(tmp_path):
    log_file = tmp_path / "agent.log"
    setup_logging("info", json_lines=False, file=log_file, stream=io.StringIO(), max_bytes=2_000, backups=2)
    log = logging.getLogger("cl_agent.test")
    for i in range(200):
        log.info("line %03d %s", i, "x" * 40)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["agent.log", "agent.log.1", "agent.log.2"]  # older files were deleted
    assert all(p.stat().st_size <= 2_000 for p in tmp_path.iterdir())
    assert "line 199" in log_file.read_text()  # the newest lines are in the current file
    assert "line 000" not in "".join(p.read_text() for p in tmp_path.iterdir())


def test_a_zero_size_limit_never_rotates(tmp_path):
    log_file = tmp_path / "agent.log"
    setup_logging("info", json_lines=False, file=log_file, stream=io.StringIO(), max_bytes=0)
    for i in range(200):
        logging.getLogger("cl_agent.test").info("line %03d %s", i, "x" * 40)
    assert [p.name for p in tmp_path.iterdir()] == ["agent.log"] and "line 000" in log_file.read_text()
