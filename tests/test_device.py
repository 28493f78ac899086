"""resolve_device: the accepted names, and a clear error naming the setting for every other one."""

from __future__ import annotations

import pytest
import torch

from cl_agent.device import resolve_device
from cl_agent.errors import CLAgentError


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_cpu_and_auto_without_cuda(monkeypatch):
    no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_and_cuda_names_with_one_gpu(monkeypatch):
    one_gpu(monkeypatch)  # torch.device objects are made without touching the driver
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "", "cpu:0 "])
def test_unknown_names_are_refused_naming_the_setting_and_the_accepted_forms(monkeypatch, name):
    one_gpu(monkeypatch)
    with pytest.raises(CLAgentError) as info:
        resolve_device(name, "agent.device")
    message = str(info.value)
    assert message.startswith("agent.device = ") and repr(name) in message
    assert "auto, cpu, cuda or cuda:N" in message


def test_not_a_string_is_refused(monkeypatch):
    no_cuda(monkeypatch)
    with pytest.raises(CLAgentError, match=r"^--device = 3: expected auto, cpu, cuda or cuda:N"):
        resolve_device(3, "--device")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:2"])
def test_cuda_without_cuda_says_so(monkeypatch, name):
    no_cuda(monkeypatch)
    with pytest.raises(CLAgentError, match=rf"^--device = '{name}': CUDA is not available on this machine$"):
        resolve_device(name, "--device")


def test_auto_never_fails_without_cuda(monkeypatch):
    no_cuda(monkeypatch)
    assert resolve_device("auto", "agent.device").type == "cpu"


def test_a_device_index_past_the_last_gpu_names_how_many_there_are(monkeypatch):
    one_gpu(monkeypatch)
    with pytest.raises(CLAgentError, match=r"^device = 'cuda:3': this machine has 1 CUDA device \(cuda:0 to cuda:0\)$"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(CLAgentError, match=r"has 2 CUDA devices"):
        resolve_device("cuda:2", "device")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_the_trainer_names_its_device_argument(monkeypatch):
    from cl_agent.config import ModelSection, TrainSection
    from cl_agent.trainer import Trainer

    no_cuda(monkeypatch)
    with pytest.raises(CLAgentError, match=r"^device = 'cuda': CUDA is not available"):
        Trainer(ModelSection(backbone="resnet10t", num_classes=4, image_size=16), TrainSection(), device="cuda")
