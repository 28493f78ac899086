"""The typed config: unknown keys and bad values are errors naming key, value and file."""

import re
from pathlib import Path

import pytest
import yaml

from cl_agent.config import AgentConfig, ConfigError, load_config, parse_override, save_resolved, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    cfg = load_config(None)
    assert isinstance(cfg, AgentConfig)
    assert cfg.train.lr == pytest.approx(4e-4)


def test_unknown_key_names_key_value_and_file(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.lrr" in message and "0.1" in message and str(path) in message


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lr: -1\n", "train.lr"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  labeled_batch: 1.5\n", "train.labeled_batch"),
        ("agent:\n  host_server: 1\n", "agent.host_server"),
        ("agent:\n  device: tpu\n", "agent.device"),
        ("train:\n  snapshot_mode: thawed\n", "train.snapshot_mode"),
        ("model:\n  mean: [0.5, 0.5]\n", "model.mean"),
        ("ingest:\n  wire:\n    encodings: [gif]\n", "ingest.wire.encodings"),
        ("spool:\n  max_classes: 200\nmodel:\n  num_classes: 100\n", "spool.max_classes"),
        ("train:\n  method: mlkd\n", "train.method"),
        ("serve:\n  providers: [cuda]\n", "serve.providers"),
        ("serve:\n  providers: [auto, CPUExecutionProvider]\n", "serve.providers"),
        ("serve:\n  providers: []\n", "serve.providers"),
        ("agent:\n  workdir: ''\n", "agent.workdir"),
        ("repository:\n  root: ' '\n", "repository.root"),
        ("ingest:\n  curve:\n    enabled: true\n", "ingest.curve.server_secret_key"),
        ("ingest:\n  curve:\n    enabled: true\n    server_secret_key: k/agent.key_secret\n", "ingest.curve.authorized_clients_dir"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.key == key
    assert str(tmp_path) in str(info.value)


def test_non_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply_and_are_checked():
    cfg = load_config(None, {"train.lr": 0.01, "model.image_size": 64})
    assert cfg.train.lr == 0.01 and cfg.model.image_size == 64
    with pytest.raises(ConfigError, match="train.epochs_min"):
        load_config(None, {"train.epochs_min": 0})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, {"train.method": "naive"})
    path = save_resolved(cfg, tmp_path / "resolved.yaml")
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)


def _keys(node: dict, prefix: str = ""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _keys(value, path + ".")
        else:
            yield path


def test_robot_yaml_is_complete_valid_and_commented():
    path = ROOT / "configs" / "robot.yaml"
    load_config(path)  # valid
    documented = set(_keys(yaml.safe_load(path.read_text())))
    every = set(_keys(to_dict(AgentConfig())))
    assert every - documented == set(), "keys missing from configs/robot.yaml"
    for line in path.read_text().splitlines():
        if re.match(r"^\s*[a-z_]+:\s*\S", line):  # a key with a value
            assert "#" in line, f"uncommented key in robot.yaml: {line!r}"


def test_label_map_size_follows_the_model_unless_set():
    assert load_config(None, {"model.num_classes": 10}).spool.max_classes == 10
    assert load_config(None, {"model.num_classes": 10, "spool.max_classes": 6}).spool.max_classes == 6


@pytest.mark.parametrize("text", ["train:\n  lr: 1e-3\n", "train:\n  lr: '1e-3'\n", "train:\n  lr: 1.0e-3\n"])
def test_exponent_floats_are_numbers(tmp_path, text):
    # YAML 1.1 reads 1e-3 (no dot) as a string; it is still a number to a person
    assert load_config(write(tmp_path, text)).train.lr == pytest.approx(1e-3)


def test_numeric_strings_from_the_command_line():
    cfg = load_config(None, dict(parse_override(o) for o in ["train.lr=1e-3", "train.ema_decay=9.9e-1", "spool.max_bytes=1000"]))
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.ema_decay == pytest.approx(0.99)
    assert load_config(None, {"spool.max_bytes": "1000"}).spool.max_bytes == 1000


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("train.lr", "fast", "expected a number"),
        ("train.lr", "nan", "finite"),
        ("train.lr", "inf", "finite"),
        ("train.lr", float("inf"), "finite"),
        ("train.lr", float("nan"), "finite"),
        ("train.lr", True, "expected a number"),
        ("train.lr", "true", "expected a number"),
        ("spool.max_bytes", "1e3", "expected an integer"),
        ("spool.max_bytes", "10.0", "expected an integer"),
        ("spool.max_bytes", "many", "expected an integer"),
        ("spool.max_bytes", "-5", "must be >= 1"),
    ],
)
def test_non_numbers_are_still_rejected(key, value, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        load_config(None, {key: value})
    assert info.value.key == key and str(value) in str(info.value)


def test_empty_override_of_a_string_is_the_empty_string():
    cfg = load_config(None, dict([parse_override("repository.announce_endpoint="), parse_override("serve.trt_cache_dir= ")]))
    assert cfg.repository.announce_endpoint == "" and cfg.serve.trt_cache_dir == ""
    with pytest.raises(ConfigError, match="train.lr.*expected a number"):
        load_config(None, dict([parse_override("train.lr=")]))


def test_malformed_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.lr.*\[1,"):
        parse_override("train.lr=[1,")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("=3")


def test_duplicate_keys_are_an_error_naming_key_lines_and_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  epochs_min: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert info.value.key == "train.lr" and str(path) in message
    assert "duplicate" in message and "line 2" in message and "line 4" in message
    with pytest.raises(ConfigError, match="duplicate") as info:
        load_config(write(tmp_path, "train:\n  lr: 0.1\nmodel: {}\ntrain:\n  lr: 0.2\n"))
    assert info.value.key == "train"


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "mal.yaml"
    path.write_text("train:\n  lr: 0.1\n   epochs_min: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "line 3, column" in message
    assert "<unicode string>" not in message and "<file>" not in message


def test_unreadable_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="binary.yaml"):
        load_config(path)


def test_empty_section_and_empty_string_value_in_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  # lr: 0.1\nrepository:\n  announce_endpoint:\n"))
    assert cfg.train.lr == pytest.approx(4e-4) and cfg.repository.announce_endpoint == ""


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("ingest.labeled_endpoint", "tcp//127.0.0.1:5555", "expected an endpoint"),
        ("ingest.frame_endpoint", "udp://127.0.0.1:5556", "schemes: tcp, ipc, inproc"),
        ("serve.endpoint", "tcp://127.0.0.1:99999", "port '99999'"),
        ("serve.endpoint", "tcp://127.0.0.1", "needs HOST:PORT"),
        ("repository.announce_endpoint", "tcp://", "empty"),
        ("ingest.frame_connect", ["tcp://10.0.0.5:5555", "nowhere"], "expected an endpoint"),  # each entry of the list
    ],
)
def test_bad_endpoints_are_config_errors_naming_the_key(key, value, reason):
    with pytest.raises(ConfigError, match=re.escape(reason)) as info:
        load_config(None, {key: value})
    assert key in str(info.value)


@pytest.mark.parametrize("value", ["tcp://*:5558", "tcp://[::1]:5558", "tcp://robot.local:0", "ipc:///run/cl.sock", "inproc://x", ""])
def test_good_endpoints_and_the_empty_string_are_accepted(value):
    assert load_config(None, {"repository.announce_endpoint": value}).repository.announce_endpoint == value


def test_provider_names_onnxruntime_knows_are_accepted_installed_here_or_not():
    cfg = load_config(None, {"serve.providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]})
    assert cfg.serve.providers[-1] == "CPUExecutionProvider"


def test_the_config_command_checks_the_backbone_and_warns_about_this_machine(tmp_path):
    import onnxruntime
    import torch
    from typer.testing import CliRunner

    from cl_agent.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["config", "--set", "model.backbone=resnet_typo"])
    assert bad.exit_code == 2 and "model.backbone = 'resnet_typo': timm has no model" in bad.output
    good = runner.invoke(app, ["config", "--set", "model.backbone=resnet18", "--set", "train.time_budget_s=600"])  # no CPU-speed warning either
    assert good.exit_code == 0 and "warning" not in good.output and "backbone: resnet18" in good.output
    missing = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p not in onnxruntime.get_available_providers()]
    if torch.cuda.is_available() or not missing:
        pytest.skip("this machine has CUDA: nothing to warn about")
    warned = runner.invoke(app, ["config", "--set", "agent.device=cuda", "--set", f"serve.providers=[{missing[0]}]"])
    assert warned.exit_code == 0
    assert "agent.device = 'cuda', and CUDA is not available" in warned.output and f"{missing[0]} not installed" in warned.output


def test_a_labeled_batch_of_one_image_is_refused_naming_the_key():
    # BatchNorm cannot train on a batch of one image: the config stops it before the trainer crashes
    with pytest.raises(ConfigError) as info:
        load_config(None, {"train.labeled_batch": 1})
    assert info.value.key == "train.labeled_batch" and ">= 2" in str(info.value)
    assert load_config(None, {"train.labeled_batch": 2}).train.labeled_batch == 2
