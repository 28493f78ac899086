"""`cl-agent demo`, the README's main command, end to end with a tiny model."""

from cl_agent.demo import TINY, run_demo


def test_demo_streams_learns_and_serves_each_version(tmp_path, capsys):
    code = run_demo(tmp_path / "demo", experiences=2, device="cpu", timeout_s=240, overrides=dict(TINY))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "served version 1" in out and "served version 2" in out
    assert "sent 180 labeled images (all acked)" in out
    assert (tmp_path / "demo" / "agent" / "experiences.jsonl").exists()
