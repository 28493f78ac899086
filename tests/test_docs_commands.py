"""The commands, options, config keys and files that README.md and the Markdown files under docs/ name exist.

Every ``cl-agent ...`` in a fenced code block or an inline code span is walked
through the Typer app: each subcommand must exist and each option must belong
to the command it is given to; ``--set section.key=value`` must name a config
key. ``tools/X.py --opt`` and ``python -m cl_agent.X --opt`` must name a file
that exists and an option its parser defines. YAML examples whose top level is
config sections must load as a config, and repository paths named in code
(``configs/...``, ``docs/...``, ``tools/...``) must exist. Nothing is run: the
checks read the click command tree, the source and the file system.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import typer.main
import yaml

from cl_agent.cli import app
from cl_agent.config import AgentConfig, ConfigError, build

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
CL_AGENT = re.compile(r"(?:^|(?<=[\s/(]))cl-agent(?=\s|$)")
TOOL = re.compile(r"(?:^|(?<=[\s/]))(?:tools/)?(\w+\.py)(?=\s|$)")
MODULE = re.compile(r"-m\s+(cl_agent\.\w+)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:configs|docs|tools|cl_agent|tests)/[\w./*<>-]*\w)")
TEST_ID = re.compile(r"(tests/test_\w+\.py)::(\w+)")
SHELL_STOP = re.compile(r"\s(?:#|&&|\|\||\||;)(?=\s|$)")


@dataclasses.dataclass
class Snippet:
    """One line of code from a doc: a fenced-block line (continuations joined) or an inline span."""

    where: str  # "docs/serving.md:152"
    text: str
    lang: str  # the fence's language, "" for none, "inline" for a span


def snippets(path: Path) -> list[Snippet]:
    out: list[Snippet] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    name = path.relative_to(ROOT).as_posix()
    lang = None  # None outside a fence
    pending, pending_line = "", 0
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if fence:
            lang = fence.group(2) if lang is None else None
            continue
        if lang is None:
            out += [Snippet(f"{name}:{number}", m.group(1), "inline") for m in INLINE.finditer(line)]
            continue
        if not pending:
            pending_line = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(Snippet(f"{name}:{pending_line}", pending + line, lang))
        pending = ""
    return out


ALL = [s for path in DOCS for s in snippets(path)]
SHELL = [s for s in ALL if s.lang not in ("python", "json", "yaml")]


def shell_words(text: str) -> list[str]:
    """The words of one command, up to a comment or the next command; [--opt X] brackets dropped."""
    text = SHELL_STOP.split(" " + text)[0]
    text = text.replace("[", " ").replace("]", " ")
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def config_keys() -> set[str]:
    keys = set()

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            keys.add(prefix + f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")

    walk(AgentConfig(), "")
    return keys


KEYS = config_keys()


# Typer may ship its own copy of click, so commands and options are recognised by
# their attributes (a group has ``commands``; an option is a param with
# ``param_type_name == "option"``), not by click classes.


def option_names(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def is_group(command) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def check_cl_agent(words: list[str]) -> list[str]:
    """Problems with one ``cl-agent`` command line (the words after ``cl-agent``)."""
    command = typer.main.get_command(app)
    path = ["cl-agent"]
    problems = []
    index = 0
    # subcommands: while the command is a group, a bare word must name one of its commands
    while is_group(command) and index < len(words) and not words[index].startswith("-"):
        word = words[index]
        if word not in command.commands:
            return [f"'{' '.join(path)}' has no command {word!r} (it has: {', '.join(sorted(command.commands))})"]
        command = command.commands[word]
        path.append(word)
        index += 1
    known = option_names(command)
    rest = words[index:]
    for position, word in enumerate(rest):
        if not word.startswith("-") or word in ("-", "--") or word.startswith("-" * 3):
            continue
        name, _, value = word.partition("=")
        if name not in known:
            problems.append(f"'{' '.join(path)}' has no option {name} (it has: {', '.join(sorted(known))})")
            continue
        if name == "--set":
            value = value or (rest[position + 1] if position + 1 < len(rest) else "")
            key = value.partition("=")[0]
            if key not in KEYS:
                problems.append(f"'{' '.join(path)} --set {value}': {key!r} is not a config key")
    return problems


def check_python_options(words: list[str], source: Path) -> list[str]:
    """Every --option in words is a quoted string in source (argparse ``add_argument("--x", ...)``), or in a
    sibling module it imports (``from chaos import add_run_options``: tools share option sets)."""
    text = source.read_text(encoding="utf-8")
    for sibling in re.findall(r"^from (\w+) import", text, re.M):
        if (source.parent / f"{sibling}.py").is_file():
            text += (source.parent / f"{sibling}.py").read_text(encoding="utf-8")
    problems = []
    for word in words:
        if word.startswith("--") and len(word) > 2:
            name = word.partition("=")[0]
            if name != "--help" and f'"{name}"' not in text and f"'{name}'" not in text:
                problems.append(f"{source.relative_to(ROOT).as_posix()} has no option {name}")
    return problems


def problems_in(snippet: Snippet) -> list[str]:
    text = snippet.text
    problems = []
    for match in CL_AGENT.finditer(text):
        words = shell_words(text[match.end():])
        if words and words[0].endswith(":"):
            continue  # a label in a diagram ("cl-agent serve:  watcher thread ..."), not a command
        problems += check_cl_agent(words)
    for match in TOOL.finditer(text):
        tool = ROOT / "tools" / match.group(1)
        if not tool.is_file():
            if "tools/" in text[max(0, match.start() - 6): match.end()]:
                problems.append(f"tools/{match.group(1)} does not exist")
            continue
        problems += check_python_options(shell_words(text[match.end():]), tool)
    for match in MODULE.finditer(text):
        module = ROOT / (match.group(1).replace(".", "/") + ".py")
        if not module.is_file():
            problems.append(f"module {match.group(1)} does not exist")
            continue
        problems += check_python_options(shell_words(text[match.end():]), module)
    return problems


def missing_paths(snippet: Snippet) -> list[str]:
    problems = []
    for match in REPO_PATH.finditer(snippet.text):
        reference = match.group(1)
        if re.search(r"[A-Z]{3,}", reference):  # a placeholder such as configs/bench/NAME.yaml
            continue
        pattern = re.sub(r"<[^>]*>", "*", reference)
        if not any(ROOT.glob(pattern)) and not (ROOT / pattern).exists():
            problems.append(f"{reference} does not exist")
    for match in TEST_ID.finditer(snippet.text):
        path, name = ROOT / match.group(1), match.group(2)
        if path.is_file() and not re.search(rf"^\s*def {name}\(", path.read_text(encoding="utf-8"), re.M):
            problems.append(f"{match.group(1)} has no test {name}")
    return problems


# --------------------------------------------------------------------------- tests


def test_the_docs_name_commands_at_all():
    """Guards the parser: if it stopped finding commands, every other test here would pass vacuously."""
    named = [s for s in ALL if CL_AGENT.search(s.text)]
    assert len(named) >= 20, [s.where for s in named]
    assert any(TOOL.search(s.text) for s in SHELL)


def test_every_cl_agent_command_and_option_in_the_docs_exists():
    problems = [f"{s.where}: {p}   [{s.text.strip()}]" for s in ALL if s.lang not in ("python", "json") for p in problems_in(s)]
    assert problems == [], "\n".join(problems)


def test_every_repository_path_in_the_docs_exists():
    problems = [f"{s.where}: {p}" for s in ALL for p in missing_paths(s)]
    assert problems == [], "\n".join(problems)


def test_every_config_example_in_the_docs_loads():
    sections = {f.name for f in dataclasses.fields(AgentConfig)}
    checked = 0
    problems = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"^```yaml\n(.*?)^```", text, re.S | re.M):
            where = f"{path.relative_to(ROOT).as_posix()}:{text[: match.start()].count(chr(10)) + 1}"
            data = yaml.safe_load(match.group(1))
            if not isinstance(data, dict) or not set(data) <= sections:
                continue
            checked += 1
            try:
                build(AgentConfig, data, where)
            except ConfigError as e:
                problems.append(str(e))
    assert checked >= 2
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("cl-agent serve --config robot.yaml --no-such-option 3", "no option --no-such-option"),
        ("cl-agent models purge --repo runs/models", "no command 'purge'"),
        ("cl-agent run --set train.no_such_key=1", "'train.no_such_key' is not a config key"),
        ("python tools/send_labeled.py data/ --no-such-flag", "no option --no-such-flag"),
        ("python tools/no_such_tool.py --json", "tools/no_such_tool.py does not exist"),
    ],
)
def test_the_checks_catch_a_made_up_command(line, problem):
    found = problems_in(Snippet("made-up", line, "bash"))
    assert any(problem in p for p in found), found


def test_the_path_check_catches_a_missing_file():
    found = missing_paths(Snippet("made-up", "see configs/bench/no_such_profile.yaml and docs/results/quick/s<n>-naive.json", "inline"))
    assert found == ["configs/bench/no_such_profile.yaml does not exist"]
    found = missing_paths(Snippet("made-up", "tests/test_faults.py::test_that_was_renamed", "inline"))
    assert found == ["tests/test_faults.py has no test test_that_was_renamed"]


def test_the_checks_accept_real_commands():
    for line in [
        "cl-agent models rollback --to 3 --repo runs/models --model student [--announce tcp://127.0.0.1:5557]",
        "cl-agent serve --repo models --follow tcp://h:5560 \\ --set serve.endpoint=tcp://0.0.0.0:5558",
        ".venv/bin/cl-agent demo --experiences 2   # a comment --not-an-option",
        "python tools/chaos.py --trials 2 --seed 1",
    ]:
        assert problems_in(Snippet("real", line, "bash")) == [], line
