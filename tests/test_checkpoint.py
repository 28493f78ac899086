import pickle

import pytest
import torch

from cl_agent.checkpoint import load_state
from cl_agent.errors import CLAgentError
from cl_agent.trainer import Trainer
from learning_stream import make_stream, tiny_model, tiny_train


@pytest.fixture(scope="module")
def experiences():
    return make_stream(num_experiences=4, classes_per_experience=2, per_class=8, unlabeled=16, seed=3)[0]


def test_restore_and_continue_equals_never_stopping(tmp_path, experiences):
    train = tiny_train(epochs_base=1, snapshot_mode="frozen")
    uninterrupted = Trainer(tiny_model(8), train, seed=7)
    for experience in experiences[:2]:
        uninterrupted.train_experience(*experience)
    path = uninterrupted.save_checkpoint(tmp_path / "trainer.pt", extra={"label_names": ["a", "b"]})
    probe = experiences[3][0]
    before = uninterrupted.predict(probe)

    restored = Trainer.load_checkpoint(path)
    assert restored.checkpoint_extra == {"label_names": ["a", "b"]}
    assert restored.experience_index == 2 and restored.seen_classes == {0, 1, 2, 3}
    assert len(restored.teachers.snapshots) == len(uninterrupted.teachers.snapshots) == 1
    assert torch.equal(restored.predict(probe), before)

    for experience in experiences[2:]:
        a = uninterrupted.train_experience(*experience)
        b = restored.train_experience(*experience)
        assert a["loss"] == b["loss"]
    assert torch.equal(uninterrupted.predict(probe), restored.predict(probe))
    for (name, p), q in zip(uninterrupted.student.state_dict().items(), restored.student.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(uninterrupted.memory.features, restored.memory.features)


def test_load_checkpoint_in_place_on_an_instance(tmp_path, experiences):
    source = Trainer(tiny_model(8), tiny_train(epochs_base=1), seed=1)
    source.train_experience(*experiences[0])
    path = source.save_checkpoint(tmp_path / "a.pt")
    target = Trainer(tiny_model(8), tiny_train(epochs_base=1, time_budget_s=5.0), seed=2)
    assert target.load_checkpoint(path) is target
    assert target.experience_index == 1 and target.train_config.time_budget_s == 5.0
    assert torch.equal(target.predict(experiences[1][0]), source.predict(experiences[1][0]))
    with pytest.raises(CLAgentError, match=r"another model \(model.num_classes: 8 there, 6 in the config\)\. Set the config back"):
        Trainer(tiny_model(6), tiny_train()).load_checkpoint(path)


def test_checkpoint_loads_with_weights_only_and_holds_everything(tmp_path, experiences):
    trainer = Trainer(tiny_model(8), tiny_train(epochs_base=1), seed=0)
    trainer.train_experience(*experiences[0])
    path = trainer.save_checkpoint(tmp_path / "ckpt.pt")
    state = torch.load(path, weights_only=True)
    assert {"student", "teachers", "optimizer", "memory", "seen_classes", "experience_index", "weights", "rng"} <= state.keys()
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(CLAgentError, match="not found"):
        Trainer.load_checkpoint(tmp_path / "missing.pt")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(print, protocol=2))
    with pytest.raises(CLAgentError, match="could not be read"):
        load_state(evil)
    other = tmp_path / "other.pt"
    torch.save({"hello": 1}, other)
    with pytest.raises(CLAgentError, match="format"):
        load_state(other)
