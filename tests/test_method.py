import pytest

from cl_agent.config import TrainSection
from cl_agent.errors import CLAgentError
from cl_agent.method import METHODS, epochs_for, get_method, loss_weights


def test_mlkd_ssl_weight_schedule_matches_the_defaults():
    train, method = TrainSection(), get_method("mlkd_ssl")
    w0, w1, w5 = (loss_weights(method, train, t) for t in (0, 1, 5))
    assert w0["ssl"] == pytest.approx(0.5) and w1["ssl"] == pytest.approx(0.475) and w5["ssl"] == pytest.approx(0.5 * 0.95**5)
    assert w0["ce"] == pytest.approx(0.95) and w1["ce"] == pytest.approx(1 - 0.1 * 0.475)
    assert w0["kd_feature"] == pytest.approx(0.002) and w5["kd_feature"] == pytest.approx(0.012)
    assert w0["kd_feature_unlabeled"] == 0 and w1["kd_feature_unlabeled"] == pytest.approx(0.004)
    assert w0["kd_logit"] == 0 and w1["kd_logit"] == pytest.approx(0.1)
    assert w0["memory"] == pytest.approx(0.4) and w0["margin"] == 0.0 and w0["lwf"] == 0.0


def test_epoch_schedule():
    train = TrainSection()
    assert [epochs_for(train, t) for t in (0, 1, 48, 49, 50, 100)] == [74, 73, 26, 25, 25, 25]


def test_baselines_and_ablations_switch_the_right_terms():
    train = TrainSection()
    naive = loss_weights(get_method("naive"), train, 3)
    assert naive["ce"] == 1.0 and all(v == 0 for k, v in naive.items() if k != "ce")
    assert loss_weights(get_method("joint"), train, 0) == loss_weights(get_method("naive"), train, 0)
    lwf = loss_weights(get_method("lwf_unlabeled"), train, 1)
    assert lwf["lwf"] == 1.0 and lwf["kd_logit"] == 0 and loss_weights(get_method("lwf_unlabeled"), train, 0)["lwf"] == 0
    assert loss_weights(get_method("mlkd_ssl_fixed_ssl"), train, 7)["ssl"] == pytest.approx(0.5)
    assert loss_weights(get_method("mlkd_ssl_no_ssl"), train, 2)["ssl"] == 0 and loss_weights(get_method("mlkd_ssl_no_ssl"), train, 2)["ce"] == 1.0
    assert loss_weights(get_method("mlkd_ssl_no_feature_kd"), train, 2)["kd_feature"] == 0
    assert loss_weights(get_method("mlkd_ssl_no_logit_kd"), train, 2)["kd_logit"] == 0
    assert get_method("mlkd_ssl_single_teacher").teachers == "ema"


def test_unknown_method_lists_the_names():
    with pytest.raises(CLAgentError) as e:
        get_method("fancy")
    assert "fancy" in str(e.value) and all(name in str(e.value) for name in METHODS)


def test_unlabeled_feature_and_logit_distillation_start_together_at_kd_unlabeled_start():
    train, method = TrainSection(kd_unlabeled_start=2), get_method("mlkd_ssl")
    for t in (0, 1):
        assert loss_weights(method, train, t)["kd_feature_unlabeled"] == 0 and loss_weights(method, train, t)["kd_logit"] == 0
    assert loss_weights(method, train, 2)["kd_feature_unlabeled"] > 0 and loss_weights(method, train, 2)["kd_logit"] > 0
    assert loss_weights(method, TrainSection(kd_unlabeled_start=0), 0)["kd_logit"] > 0


def test_steps_per_epoch_merges_a_single_leftover_image_into_the_last_batch():
    from cl_agent.method import steps_per_epoch

    assert [steps_per_epoch(n, 16) for n in (1, 2, 16, 17, 18, 32, 33, 34)] == [1, 1, 1, 1, 2, 2, 2, 3]
