import torch

from cl_agent.student import create_student
from cl_agent.teacher import Teachers, ema_update, frozen_copy, gather_selected, select_teacher, teacher_outputs
from learning_stream import tiny_model


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _distance(a, b) -> float:
    return sum((p - q).pow(2).sum().item() for p, q in zip(a.parameters(), b.parameters()))


def _student_step(student):
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student.train()
    loss = student(torch.randn(8, 3, 16, 16)).pow(2).mean()
    loss.backward()
    opt.step()


def test_frozen_snapshots_unchanged_by_student_steps_and_teacher_passes():
    torch.manual_seed(0)
    student = create_student(tiny_model())
    teachers = Teachers(student, keep=2, mode="frozen", decay=0.9)
    for t in range(3):
        teachers.start_experience(student, t)
        _student_step(student)
        teachers.update(student)
    assert len(teachers.snapshots) == 2
    before = [_state(s) for s in teachers.snapshots]
    _student_step(student)
    teacher_outputs(teachers.modules(), torch.randn(5, 3, 16, 16), batch_statistics=True)  # BN in batch mode
    teachers.update(student)
    assert all(_same(b, _state(s)) for b, s in zip(before, teachers.snapshots))
    assert all(not p.requires_grad for m in teachers.modules() for p in m.parameters())


def test_ema_moves_toward_the_student_and_copies_buffers():
    torch.manual_seed(0)
    student = create_student(tiny_model())
    teachers = Teachers(student, keep=2, mode="frozen", decay=0.9, copy_classifier=False)
    teachers.start_experience(student, 0)
    _student_step(student)
    d0 = _distance(teachers.ema, student)
    ema_before = _state(teachers.ema)
    teachers.update(student)
    assert 0 < _distance(teachers.ema, student) < d0
    # exactly the lerp: ema = 0.9 ema + 0.1 student
    name, param = next(iter(student.named_parameters()))
    assert torch.allclose(dict(teachers.ema.named_parameters())[name], 0.9 * ema_before[name] + 0.1 * param, atol=1e-6)
    for (n, b), (_, eb) in zip(student.named_buffers(), teachers.ema.named_buffers()):
        assert torch.equal(b, eb), n


def test_start_experience_recopies_the_ema_and_keeps_the_last_snapshots():
    torch.manual_seed(0)
    student = create_student(tiny_model())
    teachers = Teachers(student, keep=2, mode="frozen", decay=0.99)
    emas = []
    for t in range(4):
        teachers.start_experience(student, t)
        assert _same(_state(student), _state(teachers.ema))  # parameters and BN buffers
        _student_step(student)
        teachers.update(student)
        emas.append(_state(teachers.ema))
    teachers.start_experience(student, 4)
    assert [_same(emas[i], _state(s)) for i, s in zip((2, 3), teachers.snapshots)] == [True, True]


def test_ema_mode_snapshots_follow_the_student():
    torch.manual_seed(0)
    student = create_student(tiny_model())
    teachers = Teachers(student, keep=1, mode="ema", decay=0.5)
    teachers.start_experience(student, 0)
    teachers.start_experience(student, 1)
    before = _state(teachers.snapshots[0])
    _student_step(student)
    teachers.update(student)
    assert not _same(before, _state(teachers.snapshots[0]))


def test_ema_update_copies_classifier_when_asked():
    torch.manual_seed(0)
    a, b = create_student(tiny_model()), frozen_copy(create_student(tiny_model()))
    ema_update(b, a, 0.99, copy_classifier=True)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.rotation.weight, b.rotation.weight)


def test_per_sample_teacher_selection():
    # 3 teachers, 3 samples, 3 classes
    logits = torch.tensor(
        [
            [[5.0, 0, 0], [0, 1, 0], [0, 0, 0]],  # teacher 0
            [[0, 5.0, 0], [0, 3, 0], [0, 0, 2]],  # teacher 1
            [[1.0, 0, 0], [0, 0, 9], [9, 0, 0]],  # teacher 2
        ]
    )
    labels = torch.tensor([0, 1, 2])
    # labeled: highest p(ground truth): sample 0 -> t0, sample 1 -> t1 (t2 is confident but wrong), sample 2 -> t1
    assert select_teacher(logits, labels).tolist() == [0, 1, 1]
    # unlabeled: most confident: sample 0 -> t0 or t1 tie -> t0, sample 1 -> t2, sample 2 -> t2
    assert select_teacher(logits).tolist() == [0, 2, 2]
    features = torch.arange(3 * 3 * 2, dtype=torch.float32).view(3, 3, 2)
    picked = gather_selected(features, torch.tensor([2, 0, 1]))
    assert torch.equal(picked, torch.stack([features[2, 0], features[0, 1], features[1, 2]]))


def test_teacher_outputs_one_pass_per_teacher_shapes():
    student = create_student(tiny_model(num_classes=5))
    teachers = [frozen_copy(student), frozen_copy(student)]
    feats, logits = teacher_outputs(teachers, torch.randn(4, 3, 16, 16))
    assert feats.shape == (2, 4, student.feature_dim) and logits.shape == (2, 4, 5)
    assert not teachers[0].training  # back in eval mode after the pass
