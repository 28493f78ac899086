"""Write a fully commented YAML config with every key and its default.

Comments come from the one-line comment beside each field in cl_agent/config.py,
so the example config cannot drift from the code:

    python tools/make_config.py --out configs/robot.yaml     # or: > configs/robot.yaml
    python tools/make_config.py --check configs/robot.yaml   # exit 1 if the file differs from the code
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

import yaml

from cl_agent import config as config_module
from cl_agent.config import AgentConfig

HEADER = """\
# cl-agent configuration: every key, with its default and what it does.
# Run with:  cl-agent run --config configs/robot.yaml
# Check with: cl-agent config -c configs/robot.yaml   (prints it resolved; unknown keys are errors)
# Any key can be overridden on the command line: --set section.key=value
"""


def field_comments(cls: type) -> dict[str, str]:
    """name -> the comment on the field's line in the class source."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"^\s+(\w+):\s[^#]*?#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def section_comments() -> dict[str, str]:
    return {
        "agent": "the agent process: working directory, device, logging, shutdown",
        "ingest": "ZeroMQ endpoints for labeled batches and camera frames, validation limits, CURVE",
        "spool": "the durable labeled spool and label map",
        "reservoir": "the bounded reservoir of encoded unlabeled frames",
        "experience": "when an experience is cut",
        "model": "the student network",
        "train": "the update: MLKD + dynamic SSL (see docs/method.md)",
        "export": "ONNX export and parity check",
        "repository": "the model repository and its announcements",
        "serve": "the serving process (onnxruntime)",
        "metrics": "Prometheus /metrics, state heartbeat, live view",
    }


def render(obj, comment: str = "", indent: int = 0, name: str | None = None) -> list[str]:
    pad = "  " * indent
    lines = []
    if dataclasses.is_dataclass(obj):
        if name is not None:
            lines.append(f"{pad}{name}:" + (f"  # {comment}" if comment else ""))
            indent += 1
        comments = field_comments(type(obj))
        for f in dataclasses.fields(obj):
            lines += render(getattr(obj, f.name), comments.get(f.name, ""), indent, f.name)
        return lines
    value = yaml.safe_dump(obj, default_flow_style=True, width=10_000).strip()
    if value.endswith("\n..."):
        value = value[:-4].strip()
    value = value.removesuffix("...").strip()
    if not comment:
        raise SystemExit(f"field {name!r} has no comment in cl_agent/config.py")
    lines.append(f"{pad}{name}: {value}  # {comment}")
    return lines


def config_text() -> str:
    """The commented YAML for the default AgentConfig."""
    out = [HEADER]
    sections = section_comments()
    defaults = AgentConfig()
    for f in dataclasses.fields(defaults):
        out.append("")
        out += render(getattr(defaults, f.name), sections.get(f.name, ""), 0, f.name)
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", type=Path, default=None, help="write the config to this file (default: stdout)")
    target.add_argument("--check", type=Path, default=None, metavar="FILE", help="compare FILE with the generated config; exit 1 if it differs")
    args = parser.parse_args()
    text = config_text()
    if args.check is not None:
        try:
            current = args.check.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--check: cannot read {args.check}: {e}")
        if current != text:
            print(f"{args.check} differs from the config classes: regenerate it with --out {args.check}", file=sys.stderr)
            return 1
        print(f"{args.check} is up to date")
        return 0
    if args.out is None:
        sys.stdout.write(text)
        return 0
    if not args.out.parent.is_dir():
        parser.error(f"--out: folder {args.out.parent} does not exist")
    try:
        args.out.write_text(text, encoding="utf-8")
    except OSError as e:
        parser.error(f"--out: cannot write {args.out}: {e}")
    return 0


if __name__ == "__main__":
    assert config_module  # the module whose comments are read
    sys.exit(main())
