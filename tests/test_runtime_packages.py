"""Which onnxruntime is installed: both packages at once, or a module broken by uninstalling one over the other."""

import logging
import sys
import types

import pytest

from cl_agent import session
from cl_agent.errors import CLAgentError


def test_the_installed_runtime_is_found_and_auto_ends_with_the_cpu():
    assert session.runtime_packages()  # the tests run with one of the two installed
    assert session.choose_providers(["auto"])[-1] == "CPUExecutionProvider"


def test_both_packages_installed_is_a_warning_with_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(session, "runtime_packages", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with caplog.at_level(logging.WARNING, logger="cl_agent.session"):
        providers = session.choose_providers(["auto"])
    assert providers[-1] == "CPUExecutionProvider"
    assert "both onnxruntime and onnxruntime-gpu are installed" in caplog.text and "--force-reinstall" in caplog.text


def test_a_module_left_incomplete_by_an_uninstall_is_named_with_the_repair(monkeypatch):
    # What `pip uninstall onnxruntime` leaves when onnxruntime-gpu shared its files: a package without its API.
    broken = types.ModuleType("onnxruntime")
    broken.__path__ = ["site-packages/onnxruntime"]
    monkeypatch.setitem(sys.modules, "onnxruntime", broken)
    with pytest.raises(CLAgentError, match="onnxruntime module .* is incomplete.*--force-reinstall --no-deps"):
        session.choose_providers(["auto"])
