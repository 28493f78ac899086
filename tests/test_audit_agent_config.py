"""`cl-agent config` / `run` on a file that is not an agent config say what the file is."""

from pathlib import Path

import pytest

from cl_agent.config import ConfigError, load_config

BENCH = Path(__file__).resolve().parents[1] / "configs" / "bench"


@pytest.mark.parametrize("profile", sorted(p.name for p in BENCH.glob("*.yaml")))
def test_a_bench_profile_given_as_agent_config_is_named_as_such(profile):
    with pytest.raises(ConfigError, match="benchmark profile .*cl-agent bench cir --profile"):
        load_config(BENCH / profile)
