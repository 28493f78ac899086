import pytest
import torch

from cl_agent.errors import CLAgentError
from cl_agent.student import SeenClassMask, create_student, student_problem
from learning_stream import tiny_model


@pytest.mark.parametrize("backbone", ["resnet10t", "resnet18", "mobilenetv3_small_050"])
def test_student_shapes_and_feature_size_read_from_the_model(backbone):
    student = create_student(tiny_model(num_classes=7, backbone=backbone))
    x = torch.randn(3, 3, 16, 16)
    features = student.forward_features(x)
    assert features.shape == (3, student.feature_dim)
    assert student.forward_head(features).shape == (3, 7)
    assert student.forward_rotation(features).shape == (3, 4)
    assert torch.equal(student(x), student.forward_head(features))


def test_backbone_that_cannot_take_the_image_size_is_reported():
    with pytest.raises(CLAgentError, match="vit_tiny_patch16_224.*16x16"):
        create_student(tiny_model(backbone="vit_tiny_patch16_224"))


def test_unknown_backbone_is_named_in_the_error():
    with pytest.raises(CLAgentError, match="no_such_net"):
        create_student(tiny_model(backbone="no_such_net"))


def test_seen_class_mask_pushes_unseen_classes_down():
    student = create_student(tiny_model(num_classes=4)).eval()
    seen = torch.tensor([True, False, True, False])
    masked = SeenClassMask(student, seen)
    x = torch.randn(2, 3, 16, 16)
    out, raw = masked(x), student(x)
    assert torch.allclose(out[:, seen], raw[:, seen])
    assert (out[:, ~seen] < -1000).all()
    assert torch.equal(SeenClassMask(student, torch.zeros(4, dtype=torch.bool))(x), raw)  # nothing seen: no mask


def test_student_problem_checks_on_the_meta_device_and_confirms_a_failure_on_a_real_build(monkeypatch):
    import timm

    from cl_agent import student

    assert "cannot run on 16x16 images" in student_problem(tiny_model(backbone="vit_tiny_patch16_224"))
    assert student_problem(tiny_model(backbone="resnet10t")) is None
    assert "no_such_net" in student_problem(tiny_model(backbone="no_such_net"))
    builds = []
    real_create = timm.create_model

    def meta_lacks_an_operation(*args, **kwargs):
        on_meta = torch.get_default_device().type == "meta"
        builds.append("meta" if on_meta else "real")
        if on_meta:
            raise NotImplementedError("an operation without a meta kernel")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(student.timm, "create_model", meta_lacks_an_operation)
    assert student_problem(tiny_model(backbone="resnet10t")) is None  # the real build decides: it runs
    assert builds == ["meta", "real"]
