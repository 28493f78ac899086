"""`cl-agent config` / `run` on a file that is not an agent config say what the file is."""

from pathlib import Path

import pytest

from cl_agent.config import ConfigError, load_config

BENCH = Path(__file__).resolve().parents[1] / "configs" / "bench"


@pytest.mark.parametrize("profile", sorted(p.name for p in BENCH.glob("*.yaml")))
def test_a_bench_profile_given_as_agent_config_is_named_as_such(profile):
    with pytest.raises(ConfigError, match="benchmark profile .*cl-agent bench cir --profile"):
        load_config(BENCH / profile)


@pytest.mark.parametrize(
    "key", ["ce_ssl_factor", "kd_feature_base", "kd_logit_weight", "ssl_base", "memory_weight", "margin_weight", "margin", "lwf_weight"]
)
def test_a_negative_loss_weight_is_refused_naming_the_key(key):
    # a negative weight turns a loss into one the step maximises: training diverges instead of failing here
    with pytest.raises(ConfigError, match=f"train.{key}' = -0.5: must be >= 0"):
        load_config(None, {f"train.{key}": -0.5})
    load_config(None, {f"train.{key}": 0})
