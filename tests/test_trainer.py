import math

import pytest
import torch

from cl_agent.errors import CLAgentError
from cl_agent.trainer import Trainer, TrainingDivergedError, rotate_four_ways
from learning_stream import accuracy, make_images, make_stream, tiny_model, tiny_train


@pytest.fixture(scope="module")
def stream():
    return make_stream(num_experiences=2, classes_per_experience=2, per_class=16, unlabeled=24, seed=0)


def test_train_experience_reports_terms_and_advances(stream):
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train())
    seen_progress = []
    first = trainer.train_experience(*experiences[0], progress=seen_progress.append)
    assert first["experience"] == 0 and trainer.experience_index == 1
    assert first["steps"] == first["planned_steps"] == 2 * math.ceil(32 / 16)  # epochs(0) = max(1, 2 - 0)
    assert {"loss_ce", "loss_kd_feature", "loss_ssl"} <= first.keys() and "loss_kd_logit" not in first
    assert len(seen_progress) == first["steps"] and seen_progress[-1]["step"] == first["steps"]
    second = trainer.train_experience(*experiences[1])
    assert {"loss_kd_feature_unlabeled", "loss_kd_logit", "loss_memory"} <= second.keys()
    assert second["planned_steps"] == 1 * 2  # epochs(1) = max(1, 2 - 1)
    assert trainer.seen_classes == {0, 1, 2, 3} and len(trainer.teachers.snapshots) == 1
    assert 0 < second["memory_items"] <= 24
    logits = trainer.predict(experiences[1][0][:5])
    assert logits.shape == (5, 4) and logits.dtype == torch.float32


def test_steps_override_and_time_budget(stream):
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train("naive"))
    assert trainer.train_experience(*experiences[0], steps=3)["steps"] == 3
    result = trainer.train_experience(*experiences[1], steps=1000, time_budget_s=0.01)
    assert result["stopped_by_budget"] and 1 <= result["steps"] < 1000
    assert trainer.experience_index == 2  # a budget stop still finishes the experience


def test_step_leaves_frozen_snapshots_alone(stream):
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train())
    trainer.train_experience(*experiences[0], steps=1)
    trainer.begin_experience(experiences[1][1])
    snapshot = {k: v.clone() for k, v in trainer.teachers.snapshots[0].state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.teachers.ema.state_dict().items()}
    x, y, u = experiences[1]
    trainer.step(x[:8], y[:8], u[:8])
    assert all(torch.equal(v, trainer.teachers.snapshots[0].state_dict()[k]) for k, v in snapshot.items())
    assert any(not torch.equal(v, trainer.teachers.ema.state_dict()[k]) for k, v in ema_before.items())


def test_non_finite_loss_stops_with_a_clear_error(stream):
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train("naive"))
    with torch.no_grad():
        trainer.student.classifier.bias.fill_(float("nan"))
    before = {k: v.clone() for k, v in trainer.student.backbone.named_parameters()}
    with pytest.raises(TrainingDivergedError, match="non-finite loss"):
        trainer.train_experience(*experiences[0])
    after = dict(trainer.student.backbone.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the optimizer step was not taken


def test_bad_inputs_are_refused():
    trainer = Trainer(tiny_model(4), tiny_train("naive"))
    good = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    empty = torch.zeros(0, 16, 16, 3, dtype=torch.uint8)
    with pytest.raises(CLAgentError, match="image_size"):
        trainer.train_experience(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.tensor([0, 1]), empty)
    with pytest.raises(CLAgentError, match=r"\[0, 4\)"):
        trainer.train_experience(good, torch.tensor([0, 9]), empty)
    with pytest.raises(CLAgentError, match="int64"):
        trainer.train_experience(good, torch.tensor([0.0, 1.0]), empty)
    with pytest.raises(CLAgentError, match="at least 2"):
        trainer.train_experience(good[:1], torch.tensor([0]), empty)
    with pytest.raises(CLAgentError, match="nproc"):
        Trainer(tiny_model(4), tiny_train(nproc=2))


def test_no_single_image_batches_without_unlabeled_data():
    # 17 labeled images in batches of 16 would leave a 1-image batch, which BN cannot train on
    trainer = Trainer(tiny_model(4), tiny_train("naive"))
    images = torch.randint(0, 256, (17, 16, 16, 3), dtype=torch.uint8)
    empty = torch.zeros(0, 16, 16, 3, dtype=torch.uint8)
    result = trainer.train_experience(images, torch.arange(17) % 2, empty)
    assert result["steps"] == result["planned_steps"] == 2 * 1  # 2 epochs of one 17-image batch


def test_rotations_are_labeled_by_quarter_turns():
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    rotated, labels = rotate_four_ways(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rotated[:2], x) and torch.equal(rotated[2], torch.rot90(x[0], 1, dims=(1, 2)))


def test_inference_modules_match_predict(stream):
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train())
    trainer.train_experience(*experiences[0], steps=2)
    modules = trainer.inference_modules()
    assert len(modules) == 2 and not any(m.training for m in modules)
    images = experiences[0][0][:4]
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(trainer.model_config.mean).view(1, 3, 1, 1)) / torch.tensor(
        trainer.model_config.std
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        mean_logits = torch.stack([m(x) for m in modules]).mean(0)
    assert torch.allclose(mean_logits, trainer.predict(images), atol=1e-4)
    assert (mean_logits[:, 2:] < -1000).all()  # classes 2, 3 not seen yet


def _old_and_new_accuracy(method: str, seed: int, epochs: int) -> tuple[float, float]:
    (experiences, templates) = make_stream(num_experiences=2, classes_per_experience=2, per_class=32, unlabeled=64, seed=0)
    trainer = Trainer(tiny_model(4), tiny_train(method, augment=False, epochs_base=epochs, epochs_min=1), seed=seed)
    for experience in experiences:
        trainer.train_experience(*experience)
    gen = torch.Generator().manual_seed(99)
    old, new = torch.arange(0, 2).repeat_interleave(40), torch.arange(2, 4).repeat_interleave(40)
    return (
        accuracy(trainer.predict(make_images(templates, old, gen)), old),
        accuracy(trainer.predict(make_images(templates, new, gen)), new),
    )


def test_method_beats_naive_on_old_classes_fast():
    naive_old, naive_new = _old_and_new_accuracy("naive", seed=0, epochs=6)
    mlkd_old, mlkd_new = _old_and_new_accuracy("mlkd_ssl", seed=0, epochs=6)
    assert naive_new > 0.9 and naive_old < 0.2  # naive forgets
    assert mlkd_old > naive_old + 0.5
    assert mlkd_old + mlkd_new > naive_old + naive_new + 0.2


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_method_beats_naive_on_old_classes_more_seeds(seed):
    naive_old, naive_new = _old_and_new_accuracy("naive", seed=seed, epochs=10)
    mlkd_old, mlkd_new = _old_and_new_accuracy("mlkd_ssl", seed=seed, epochs=10)
    assert mlkd_old > naive_old + 0.5
    assert mlkd_old + mlkd_new > naive_old + naive_new + 0.2


EXPECTED_TERMS_AT_T1 = {
    "mlkd_ssl": {"ce", "kd_feature", "kd_feature_unlabeled", "kd_logit", "ssl", "memory"},
    "naive": {"ce"},
    "joint": {"ce"},
    "lwf_unlabeled": {"ce", "lwf"},
    "mlkd_ssl_no_feature_kd": {"ce", "kd_logit", "ssl", "memory"},
    "mlkd_ssl_no_logit_kd": {"ce", "kd_feature", "kd_feature_unlabeled", "ssl", "memory"},
    "mlkd_ssl_no_ssl": {"ce", "kd_feature", "kd_feature_unlabeled", "kd_logit", "memory"},
    "mlkd_ssl_fixed_ssl": {"ce", "kd_feature", "kd_feature_unlabeled", "kd_logit", "ssl", "memory"},
    "mlkd_ssl_single_teacher": {"ce", "kd_feature", "kd_feature_unlabeled", "kd_logit", "ssl", "memory"},
}


@pytest.mark.parametrize("method", sorted(EXPECTED_TERMS_AT_T1))
def test_every_method_runs_with_its_loss_terms(stream, method):
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train(method))
    trainer.train_experience(*experiences[0], steps=1)
    result = trainer.train_experience(*experiences[1], steps=1)
    terms = {k.removeprefix("loss_") for k in result if k.startswith("loss_")}
    assert terms == EXPECTED_TERMS_AT_T1[method]
    assert math.isfinite(result["loss"])
    assert len(trainer.teachers.modules()) == {"naive": 0, "joint": 0, "lwf_unlabeled": 1, "mlkd_ssl_single_teacher": 1}.get(method, 2)


@pytest.mark.parametrize(
    "options", [{"kd_logit_kind": "kl"}, {"snapshot_mode": "ema"}, {"margin_weight": 0.01}, {"augment": False, "memory_online": False}]
)
def test_method_options_run(stream, options):
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train(**options))
    trainer.train_experience(*experiences[0], steps=1)
    result = trainer.train_experience(*experiences[1], steps=2)
    assert math.isfinite(result["loss"])
    assert ("loss_margin" in result) == ("margin_weight" in options)
