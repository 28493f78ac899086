"""`cl-agent demo`, the README's main command, end to end with a tiny model."""

from cl_agent.demo import TINY, run_demo
from cl_agent.status import read_experience_records


def test_demo_streams_learns_and_serves_each_version(tmp_path, capsys):
    code = run_demo(tmp_path / "demo", experiences=2, device="cpu", timeout_s=240, overrides=dict(TINY))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "served version 1" in out and "served version 2" in out
    assert "sent 180 labeled images (all acked)" in out
    records = read_experience_records(tmp_path / "demo" / "agent")
    # each experience holds its camera frames: the demo waits for them before it ends the experience
    assert [r["unlabeled"] for r in records] == [TINY["experience.unlabeled_samples"]] * 2


def test_demo_refuses_to_empty_a_folder_it_did_not_make(tmp_path):
    import pytest

    from cl_agent.errors import CLAgentError

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(CLAgentError, match="not empty and holds no demo.yaml"):
        run_demo(precious, experiences=1, device="cpu")
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CLAgentError, match="is not a folder"):
        run_demo(tmp_path / "file", experiences=1, device="cpu")
