"""What each network of a step sees: teachers normalise over the student's batch; degenerate batch settings."""

import pytest
import torch

from cl_agent.trainer import Trainer
from learning_stream import make_stream, tiny_model, tiny_train


@pytest.fixture(scope="module")
def stream():
    return make_stream(num_experiences=2, classes_per_experience=2, per_class=16, unlabeled=24, seed=0)


@pytest.mark.parametrize(
    "method, options",
    [
        ("mlkd_ssl", {}),
        ("mlkd_ssl", {"kd_logit_kind": "kl"}),
        ("mlkd_ssl_no_feature_kd", {}),  # no labeled distillation, yet the student's pass holds labeled images
    ],
)
def test_a_teacher_equal_to_the_student_distils_nothing(stream, method, options):
    # at the first step of t = 0 the EMA is an exact copy of the student: every KD term must be ~0,
    # with SSL on (the rotated images must not enter the batch the student normalises the KD pass over)
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train(method, kd_unlabeled_start=0, **options))
    x, y, u = experiences[0]
    trainer.begin_experience(y)
    values = trainer.step(x[:16], y[:16], u[:16])
    assert values["ssl"] > 0.1
    kd = {k: v for k, v in values.items() if k.startswith("kd_")}
    assert kd.keys() == ({"kd_logit"} if method == "mlkd_ssl_no_feature_kd" else {"kd_feature", "kd_feature_unlabeled", "kd_logit"})
    assert all(v < 1e-5 for v in kd.values()), kd


def test_a_previous_model_equal_to_the_student_gives_no_lwf_loss(stream):
    # lwf_unlabeled: at the first step of t = 1 the frozen previous model is the student itself
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train("lwf_unlabeled"))
    trainer.train_experience(*experiences[0], steps=1)
    x, y, u = experiences[1]
    trainer.begin_experience(y)
    values = trainer.step(x[:16], y[:16], u[:16])
    assert values["lwf"] < 1e-5, values


def test_memory_batch_zero_trains_without_replay(stream):
    # the memory still fills (memory_online), but no item is replayed: no empty replay batch (NaN) at the second step
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train(memory_batch=0))
    result = trainer.train_experience(*experiences[0], steps=3)
    assert result["steps"] == 3 and "loss_memory" not in result and result["memory_items"] > 0


def test_before_unlabeled_distillation_only_the_rotated_frames_are_augmented(stream, monkeypatch):
    import cl_agent.trainer as trainer_module

    sizes, real_augment = [], trainer_module.augment
    monkeypatch.setattr(trainer_module, "augment", lambda images, *args: sizes.append(len(images)) or real_augment(images, *args))
    (experiences, _) = stream
    trainer = Trainer(tiny_model(4), tiny_train(unlabeled_batch=16, rotation_images=4))  # t = 0 < kd_unlabeled_start
    x, y, u = experiences[0]
    trainer.begin_experience(y)
    values = trainer.step(x[:16], y[:16], u[:16])
    assert sizes == [16, 4] and "ssl" in values  # 16 labeled, the 4 frames rotated (not all 16)


def test_a_single_leftover_image_joins_the_last_batch_of_the_epoch():
    # 33 images in batches of 16: two batches per epoch (16 + 17), not three (16 + 16 + 1)
    trainer = Trainer(tiny_model(4), tiny_train("naive"))
    images = torch.randint(0, 256, (33, 16, 16, 3), dtype=torch.uint8)
    batches, real_step = [], trainer.step
    trainer.step = lambda labeled, labels, unlabeled: batches.append(len(labeled)) or real_step(labeled, labels, unlabeled)
    result = trainer.train_experience(images, torch.arange(33) % 2, torch.zeros(0, 16, 16, 3, dtype=torch.uint8))
    assert result["planned_steps"] == 2 * 2 and batches == [16, 17, 16, 17]  # epochs(0) = 2
