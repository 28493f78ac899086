"""The ``cl-agent`` command line. Commands parse arguments and call into the library.

Heavy modules (torch, onnxruntime) are imported inside the commands so that
``cl-agent --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from cl_agent.config import AgentConfig, ConfigError, load_config, parse_override
from cl_agent.errors import EXIT_ERROR, CLAgentError, exit_code

# Plain help text (click's layout), not typer's Rich panels: typer 0.2x's panels print a type after
# every option, flags included (`--json <bool>`, `--help <bool>`), as if they took a value; the plain
# layout prints types only for options that take one.
HELP_MARKUP = None


class HelpGroup(TyperGroup):
    """A command group whose command list gives each command's first sentence whole (wrapped),
    where the plain layout would cut it at the terminal width with '...'."""

    def format_commands(self, ctx, formatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=500)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def command_group(help_text: str, **options) -> typer.Typer:
    return typer.Typer(help=help_text, cls=HelpGroup, rich_markup_mode=HELP_MARKUP, no_args_is_help=True, **options)


app = command_group(
    "cl-agent: online continual learning for vision streams (MLKD + dynamic SSL), ONNX export and hot-swapping serving.",
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
models_app = command_group("Inspect, roll back and hold the versions in a model repository.")
bench_app = command_group("Benchmarks: the CIR learning benchmark and result comparison.")
keys_app = command_group("CURVE key management for authenticated endpoints.")
labels_app = command_group("The class-name map of an agent's working directory (labels.json).")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.add_typer(keys_app, name="keys")
app.add_typer(labels_app, name="labels")

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config", "-c", metavar="FILE",
        help="YAML config file (see configs/robot.yaml). Without it, the built-in defaults (`cl-agent config` prints them).",
    ),
]  # fmt: skip
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.lr=0.001 (repeatable); applied over --config or the defaults."),
]

RepoOpt = Annotated[
    Optional[Path], typer.Option(help="Model repository root (default: repository.root of --config; runs/models without one).")
]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model name (default: agent.model_name of --config; student without one).")]


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def resolve_config(config: Optional[Path], overrides: Optional[list[str]], options: Optional[dict] = None) -> AgentConfig:
    """The config file with the ``--set`` overrides, then a command's own options (key -> value; None = not given)
    on top: every value goes through the config's checks."""
    values = dict(parse_override(o) for o in overrides or [])
    values.update({k: v for k, v in (options or {}).items() if v is not None})
    return load_config(config, values)


# --------------------------------------------------------------------------- the agent


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the agent: ingest streams, update the student per experience, export and publish models."""
    from cl_agent.entry import RUN_STOP, request_stop_on_signals

    request_stop_on_signals(RUN_STOP)  # again: `cl-agent run` installed them before its imports (cl_agent/entry.py)
    from cl_agent.agent import run_agent

    cfg = resolve_config(config, set_)
    raise typer.Exit(run_agent(cfg, RUN_STOP))


@app.command()
def ingest(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run only the ingestion half (labeled spool, frame reservoir, experiences) until SIGINT/SIGTERM."""
    from cl_agent.ingest import run_ingest

    cfg = resolve_config(config, set_)
    raise typer.Exit(run_ingest(cfg))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Working directory for the demo's agent, models and logs.")] = Path(
        "runs/demo"
    ),
    experiences: Annotated[int, typer.Option(min=1, help="Experiences to stream.")] = 6,
    device: Annotated[str, typer.Option(help="Training device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Self-contained demo: agent + server + built-in image stream over real ZeroMQ sockets."""
    from cl_agent.demo import run_demo

    raise typer.Exit(run_demo(workdir=workdir, experiences=experiences, device=device))


@app.command()
def serve(
    repo: Annotated[
        Optional[Path], typer.Option(help="Model repository root (default: repository.root of the config). It may not exist yet.")
    ] = None,
    model: Annotated[Optional[str], typer.Option(help="Model name inside the repository (default: agent.model_name of the config).")] = None,
    follow: Annotated[
        Optional[str],
        typer.Option(help="The agent's fetch endpoint (tcp://AGENT:5560): mirror its new versions into --repo (serve.follow_fetch_endpoint)."),
    ] = None,
    follow_announce: Annotated[
        Optional[str],
        typer.Option(help="The agent's announce endpoint when following (default: the --follow host with the announce port the agent reports; until it answers, repository.announce_endpoint's port)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve the newest model version over ZeroMQ with onnxruntime, hot-swapping new versions."""
    from cl_agent.entry import SERVE_STOP, request_stop_on_signals
    from cl_agent.logs import setup_logging
    from cl_agent.server import serve_forever

    cfg = resolve_config(config, set_, {"serve.follow_fetch_endpoint": follow, "serve.follow_announce_endpoint": follow_announce})
    setup_logging(cfg.agent.log_level, cfg.agent.log_json)
    request_stop_on_signals(SERVE_STOP)  # again: `cl-agent serve` installed them before its imports (cl_agent/entry.py)
    raise typer.Exit(serve_forever(cfg, repo=repo, model=model, stop_requested=SERVE_STOP))


@app.command()
def predict(
    images: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Image files (JPEG, PNG, BMP, WebP), or folders: every image in them and their subfolders, sorted by path.", show_default=False, metavar="IMAGE"),
    ] = None,
    endpoint: Annotated[
        Optional[str],
        typer.Option(help="The server's endpoint (default: serve.endpoint of the config; on loopback when it binds every interface)."),
    ] = None,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Classes per image (default: the server's serve.top_k).")] = None,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds to wait for each answer (tried 3 times).")] = 5.0,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
    show_status: Annotated[bool, typer.Option("--status", help="Print the server's status (version, counters, timings) as JSON instead.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Ask a running server (cl-agent serve / run) to classify images; prints the top classes and the version that answered."""
    import json

    from cl_agent.config import connect_endpoint, endpoint_problem
    from cl_agent.inference import InferenceClient, print_predictions

    cfg = resolve_config(config, set_)
    problem = endpoint_problem(endpoint) if endpoint is not None else None
    if problem:
        fail(f"--endpoint {endpoint!r}: {problem}")
    if not images and not show_status:
        fail("name at least one image file or folder (or --status)")
    target = endpoint or connect_endpoint(cfg.serve.endpoint)
    try:
        with InferenceClient(target, timeout_s=timeout, retries=2, max_message_bytes=cfg.ingest.wire.max_message_bytes) as client:
            if show_status:
                typer.echo(json.dumps(client.status(), indent=2))
                raise typer.Exit(0)
            code = print_predictions(client, images, top_k, as_json=json_)
    except CLAgentError as e:
        fail(str(e), code=1)
    raise typer.Exit(code)


WorkdirOpt = Annotated[
    Optional[Path],
    typer.Option(help="The agent's working directory (default: agent.workdir of --config; runs/agent without one)."),
]


def agent_workdir(workdir: Optional[Path], config: Optional[Path], overrides: Optional[list[str]]) -> Path:
    """``--workdir`` if given, else the config's agent.workdir; a missing folder fails with a hint naming both options."""
    if workdir is None:
        workdir = Path(resolve_config(config, overrides).agent.workdir)
        where = f"agent.workdir of {config}" if config is not None else ("agent.workdir" if overrides else "the default")
    else:
        where = "--workdir"
    if not workdir.exists():
        hint = {
            "the default": "pass --workdir DIR (the agent's agent.workdir) or --config FILE (the agent's config)",
            "--workdir": "is that the agent's agent.workdir? --config FILE reads it from the agent's config",
        }.get(where, "has the agent run with this config on this machine? else pass --workdir DIR")
        fail(f"no agent working directory at {workdir} ({where}; folder not found): {hint}")
    return workdir


def _counter_lines(counters: dict, prefix: str = "") -> list[str]:
    """``name = value`` per counter, nested ones (``rejected``) as ``rejected.reason``, in the agent's order."""
    lines = []
    for name, value in counters.items():
        if isinstance(value, dict):
            lines += _counter_lines(value, f"{prefix}{name}.") or [f"{prefix}{name} = none"]
        else:
            lines.append(f"{prefix}{name} = {value}")
    return lines


def control_status(endpoint: str, timeout: float, as_json: bool, curve: tuple) -> None:
    """Print the ingestion counters of the agent (cl-agent ingest or run) whose control endpoint is ``endpoint``."""
    import json

    from cl_agent.client import control_status as ask
    from cl_agent.security import client_options_problem

    problem = client_options_problem(endpoint, *curve, option="--control")
    if problem:
        fail(problem)
    try:
        counters = ask(endpoint, timeout_s=timeout, curve_secret_key=curve[0], curve_server_key=curve[1])
    except CLAgentError as e:
        fail(str(e), code=1)
    if as_json:
        typer.echo(json.dumps(counters, indent=2))
    else:
        typer.echo("\n".join([f"control: {endpoint}", "counters:", *(f"  {line}" for line in _counter_lines(counters))]))


@app.command()
def status(
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    control: Annotated[
        Optional[str],
        typer.Option(metavar="ENDPOINT", help="Ask a running agent (cl-agent ingest, or run) for its ingestion counters "
                     "on its control endpoint, its ingest.control_endpoint (e.g. tcp://127.0.0.1:5559), instead of "
                     "reading a working directory."),
    ] = None,
    live: Annotated[bool, typer.Option("--live", help="Ask the running agent for its ingestion counters, as --control "
                    "does, at the ingest.control_endpoint of --config, or else of the resolved config the agent wrote "
                    "in its working directory.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="With --control or --live: print the counters as JSON.")] = False,
    timeout: Annotated[float, typer.Option(min=0.001, help="With --control or --live: seconds to wait for the answer.")] = 5.0,
    curve_secret: Annotated[Optional[Path], typer.Option(help="With --control or --live: this client's CURVE secret key "
                            "file, for an agent with ingest.curve.enabled (default: none, no CURVE).")] = None,
    curve_server: Annotated[Optional[Path], typer.Option(help="With --control or --live: the agent's CURVE public key file "
                            "(default: none, no CURVE).")] = None,
) -> None:
    """Print the state of an agent: running or not, last experience, last version, counts (--control or --live: a running agent's ingestion counters)."""
    from cl_agent.status import is_ingest_only, print_status

    curve = (curve_secret, curve_server)
    if control is not None:
        if workdir is not None or live:
            fail(f"--control asks the agent at ENDPOINT; {'--live' if live else '--workdir'} finds one another way: give one of them")
        control_status(control, timeout, json_, curve)
        raise typer.Exit(0)
    if not live:
        given = [name for name, value in (("--json", json_), ("--curve-secret", curve_secret), ("--curve-server", curve_server)) if value]
        if given:
            fail(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for --control ENDPOINT or --live")
    if live and workdir is None and (config is not None or set_):
        live_status(resolve_config(config, set_), f"ingest.control_endpoint of {config or 'the defaults'}", timeout, json_, curve)
        raise typer.Exit(0)
    workdir = agent_workdir(workdir, config, set_)
    ingest_only = is_ingest_only(workdir)
    if live or ingest_only:
        live_status(workdir, None, timeout, json_, curve, ingest_only=ingest_only)
        raise typer.Exit(0)
    try:
        code = print_status(workdir)
    except CLAgentError as e:
        fail(str(e))
    raise typer.Exit(code)


def live_status(where: AgentConfig | Path, source: str | None, timeout: float, as_json: bool, curve: tuple,
                ingest_only: bool = False) -> None:
    """``status --live``: the control endpoint from a config (``source`` names it) or from a working directory's
    resolved config, then the same query and output as ``--control``."""
    from cl_agent.config import connect_endpoint
    from cl_agent.status import control_of

    if isinstance(where, Path):
        try:
            endpoint, uses_curve, path = control_of(where)
        except CLAgentError as e:
            fail(str(e), code=1)
        source = f"ingest.control_endpoint in {path}"
        if ingest_only and not as_json:
            typer.echo(f"{where}: ingestion-only process (cl-agent ingest), asked at its control endpoint")
    else:
        if not where.ingest.control_endpoint:
            fail(f"{source} is empty, so the agent answers no status queries")
        endpoint, uses_curve = connect_endpoint(where.ingest.control_endpoint), where.ingest.curve.enabled
    if uses_curve and not all(curve):
        fail(f"the agent uses CURVE (ingest.curve.enabled, {source}): pass --curve-secret (an authorized client's "
             "secret key file) and --curve-server (the agent's public key file)")
    control_status(endpoint, timeout, as_json, curve)


@labels_app.command("restore")
def labels_restore(
    workdir: Annotated[
        Optional[Path],
        typer.Option(help="The agent's working directory, where labels.json is written (default: agent.workdir of --config; runs/agent without one)."),
    ] = None,
    repo: RepoOpt = None,
    model: ModelOpt = None,
    version: Annotated[Optional[int], typer.Option(help="Version whose class_names to use (default: the newest).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Rebuild a lost labels.json from a published version's manifest (its class_names, in output order)."""
    from cl_agent.labels import highest_stored_class_id, restore_labels
    from cl_agent.repository import ModelRepository, check_repo_option

    cfg = resolve_config(config, set_)
    workdir_option = "--workdir" if workdir is not None or (config is None and not set_) else "agent.workdir"
    workdir = workdir if workdir is not None else Path(cfg.agent.workdir)
    repo, model, option = repository_target(cfg, repo, model, config is None and not set_)
    try:
        if not workdir.is_dir():
            raise CLAgentError(f"{workdir_option} {workdir} is not a folder")
        check_repo_option(repo, option)
        version, manifest = ModelRepository(repo, model).chosen_manifest(version, ": restore labels.json from a backup instead")
        notes = restore_labels(workdir, manifest["class_names"], highest_stored_class_id(workdir), f"version {version}")
    except CLAgentError as e:
        fail(str(e))
    typer.echo(f"wrote {workdir / 'labels.json'}: " + "; ".join(notes))


LabelsWorkdirOpt = Annotated[
    Optional[Path],
    typer.Option(help="The agent's working directory, holding labels.json (default: agent.workdir of --config; runs/agent without one)."),
]


def _class_rows(workdir: Path) -> list[dict]:
    from cl_agent.labels import class_usage, read_label_map

    path = workdir / "labels.json"
    names = read_label_map(path).names if path.exists() else []
    usage = class_usage(workdir)
    rows = []
    for class_id in range(max([len(names) - 1, *usage]) + 1 if names or usage else 0):
        used = usage.get(class_id, {"experiences": [], "trained": [], "open": False})
        name = names[class_id] if class_id < len(names) else None  # stored samples past the map: labels.json is older
        rows.append({"id": class_id, "name": name, **used})
    return rows


@labels_app.command("list")
def labels_list(
    workdir: LabelsWorkdirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: one object per class id.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print every class id and name of labels.json, with the experiences that hold its samples and those trained."""
    import json

    workdir = agent_workdir(workdir, config, set_)
    try:
        rows = _class_rows(workdir)
    except CLAgentError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps({"workdir": str(workdir), "classes": rows}, indent=1))
        return
    if not rows:
        typer.echo(f"{workdir / 'labels.json'}: no classes yet")
        return
    width = max(len(repr(r["name"])) for r in rows)
    typer.echo(f"{'id':>4}  {'name':<{width}}  experiences (trained)")
    for r in rows:
        name = repr(r["name"]) if r["name"] is not None else "(none: labels.json is older than the samples)"
        held = f"{len(r['experiences'])} ({len(r['trained'])})" + (" + the open one" if r["open"] else "")
        if not r["experiences"] and not r["open"]:
            held = "no samples stored"
        typer.echo(f"{r['id']:>4}  {name:<{width}}  {held}")


@labels_app.command("rename")
def labels_rename(
    old: Annotated[str, typer.Argument(help="The class name to change.")],
    new: Annotated[str, typer.Argument(help="Its new name (not a class name already).")],
    workdir: LabelsWorkdirOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Rename a class in labels.json, keeping its id: samples labeled NEW from then on train the same output.
    Only while the agent is stopped (exit 75 if one runs in the working directory). With --config or --set,
    a spool.classes there must name that id NEW already (change it first): else the agent would not start."""
    from cl_agent.labels import rename_label, workdir_lock

    workdir = agent_workdir(workdir, config, set_)
    classes = resolve_config(config, set_).spool.classes if config is not None or set_ else ()
    try:
        with workdir_lock(workdir):
            class_id = rename_label(workdir, old, new, classes)
    except CLAgentError as e:
        fail(str(e), exit_code(e))
    typer.echo(
        f"renamed class {class_id} {old!r} to {new!r} in {workdir / 'labels.json'}; versions published from now on "
        "carry the new name (those published before keep the old one)"
    )


@app.command()
def report(
    workdir: WorkdirOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="PNG to write (default: WORKDIR/report.png).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Plot online accuracy and loss terms over experiences to a PNG."""
    from cl_agent.status import write_report

    workdir = agent_workdir(workdir, config, set_)
    try:
        code = write_report(workdir, out)
    except CLAgentError as e:
        fail(str(e))
    raise typer.Exit(code)


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Validate a config file and print it fully resolved (defaults filled in).

    Beyond each value's type and range: the backbone name is looked up in timm. What depends on
    the machine (CUDA for agent.device, the installed onnxruntime providers) is only a warning
    here, as the file may be meant for another machine; `cl-agent run` refuses it.
    """
    import yaml

    from cl_agent.config import to_dict
    from cl_agent.student import backbone_problem

    cfg = resolve_config(config, set_)
    problem = backbone_problem(cfg.model.backbone)
    if problem:
        fail(problem)
    for warning in machine_warnings(cfg):
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)


def machine_warnings(cfg: AgentConfig) -> list[str]:
    """What in ``cfg`` this machine cannot run (CUDA for the trainer, providers for the server),
    or will run very slowly (updates on the CPU with no time budget)."""
    import onnxruntime
    import torch

    warnings = []
    if cfg.agent.device.startswith("cuda") and not torch.cuda.is_available():
        warnings.append(f"agent.device = {cfg.agent.device!r}, and CUDA is not available on this machine")
    missing = [p for p in cfg.serve.providers if p != "auto" and p not in onnxruntime.get_available_providers()]
    if missing:
        warnings.append(f"serve.providers: {', '.join(missing)} not installed on this machine "
                        f"(have {', '.join(onnxruntime.get_available_providers())})")
    from cl_agent.agent import slow_training_warning

    slow = slow_training_warning(cfg.agent, cfg.train, cfg.experience, cfg.model, torch.cuda.is_available(), cfg.serve)
    return warnings + ([slow] if slow else [])


# --------------------------------------------------------------------------- models


DEFAULT_REPO_OPTION = "the default repository.root (no --repo or --config given)"


def repository_target(cfg: AgentConfig, repo: Optional[Path], model: Optional[str], no_config: bool) -> tuple[Path, str, str]:
    """(repository root, model name, the option the root came from, for messages) of a ``models`` or ``labels``
    command: --repo and --model win over the config (--config, --set), which fills in what they leave out."""
    option = "--repo" if repo is not None else (DEFAULT_REPO_OPTION if no_config else "repository.root")
    return (repo if repo is not None else Path(cfg.repository.root)), (model or cfg.agent.model_name), option


def models_target(config: Optional[Path], set_: Optional[list[str]], repo: Optional[Path], model: Optional[str]) -> tuple[Path, str, str]:
    return repository_target(resolve_config(config, set_), repo, model, config is None and not set_)


@models_app.command("list")
def models_list(repo: RepoOpt = None, model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """List the published versions of a model, and the hold on publishing if there is one."""
    from cl_agent.repository import print_versions

    repo, model, option = models_target(config, set_, repo, model)
    raise typer.Exit(print_versions(repo, model, option))


@models_app.command("show")
def models_show(
    version: Annotated[Optional[int], typer.Option(help="Version to show (default: the newest).")] = None,
    repo: RepoOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print a version's manifest as JSON: classes, input, experience, metrics, parent, sha256."""
    from cl_agent.repository import print_manifest

    repo, model, option = models_target(config, set_, repo, model)
    raise typer.Exit(print_manifest(repo, model, version, option))


@models_app.command("verify")
def models_verify(repo: RepoOpt = None, model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check every version's files against the sha256 in its manifest; exit 1 if any differs or is missing."""
    from cl_agent.repository import verify_versions

    repo, model, option = models_target(config, set_, repo, model)
    raise typer.Exit(verify_versions(repo, model, option))


@models_app.command("rollback")
def models_rollback(
    to: Annotated[int, typer.Option("--to", help="Version to bring back.")],
    repo: RepoOpt = None,
    model: ModelOpt = None,
    announce: Annotated[
        Optional[str],
        typer.Option(help="PUB endpoint to announce the new version on (e.g. tcp://127.0.0.1:5557); while the agent holds it, servers find the version by polling."),
    ] = None,
    hold: Annotated[
        bool, typer.Option("--hold", help="Also hold publishing (written before the republish), so the agent's next update does not replace it.")
    ] = False,
    reason: Annotated[Optional[str], typer.Option(help="With --hold: why (shown by models list and in the agent's log).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Republish an old version as a new, higher version, so every server moves to it."""
    from cl_agent.repository import rollback

    if reason is not None and not hold:
        fail("--reason goes with --hold (or `cl-agent models hold --reason`)")
    repo, model, option = models_target(config, set_, repo, model)
    raise typer.Exit(rollback(repo, model, to, announce_endpoint=announce, hold=hold, reason=reason, option=option))


@models_app.command("hold")
def models_hold(
    repo: RepoOpt = None,
    model: ModelOpt = None,
    reason: Annotated[Optional[str], typer.Option(help="Why (shown by models list and in the agent's log).")] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace a hold already there (without it, that hold is kept and reported).")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Hold publishing: the agent goes on ingesting, training and checkpointing, but publishes no version until release."""
    from cl_agent.repository import hold_publishing

    repo, model, option = models_target(config, set_, repo, model)
    raise typer.Exit(hold_publishing(repo, model, reason, option, replace=replace))


@models_app.command("release")
def models_release(repo: RepoOpt = None, model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Lift a hold on publishing: a running agent publishes its held checkpoint (all it trained meanwhile) within about a second; exit 1 if none was held."""
    from cl_agent.repository import release_publishing

    repo, model, option = models_target(config, set_, repo, model)
    raise typer.Exit(release_publishing(repo, model, option))


# --------------------------------------------------------------------------- bench


@bench_app.command("cir")
def bench_cir(
    scenario: Annotated[int, typer.Option(min=1, max=3, help="CLVISION 2024 scenario: 1, 2 or 3.")],
    out: Annotated[Path, typer.Option(help="Folder for results.json and accuracy.png.")],
    method: Annotated[str, typer.Option(help="mlkd_ssl, naive, lwf_unlabeled, joint, or an ablation.")] = "mlkd_ssl",
    profile: Annotated[str, typer.Option(help="smoke, quick, full (configs/bench/NAME.yaml) or a YAML path.")] = "quick",
    seed: Annotated[int, typer.Option(help="Seed of the stream draw and the training.")] = 0,
    data: Annotated[
        Optional[Path], typer.Option(help="Image folder: classes.tsv + train/val (dirs or .tar). Default: ../shared.")
    ] = None,
    scenarios: Annotated[
        Optional[Path], typer.Option(help="Folder of clvision2024_s{1,2,3}.json, or one table. Default: ../shared.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Run one CIR scenario x one method x one profile; writes OUT/results.json and OUT/accuracy.png."""
    from cl_agent.bench_profile import load_profile, portable_path, profile_path
    from cl_agent.benchmark import BenchRun, run_benchmark
    from cl_agent.device import resolve_device
    from cl_agent.scenario import (
        ImageFolder,
        default_data_dir,
        default_scenarios_dir,
        load_scenario,
        scenario_path,
    )

    data = data or default_data_dir()
    scenarios = scenarios or default_scenarios_dir()
    if data is None or scenarios is None:
        fail("../shared was not found beside the repository: pass --data and --scenarios")
    table_path = scenarios if scenarios.is_file() else scenario_path(scenarios, scenario)
    bench_profile = load_profile(profile)
    table = load_scenario(table_path)
    folder = ImageFolder(data, bench_profile.model.image_size)
    sources = {
        "profile_name": profile,
        "profile_file": portable_path(profile_path(profile)),
        "scenario_table": portable_path(table_path),
        "data": portable_path(data),
    }
    run_ = BenchRun(scenario, table, folder, bench_profile, method, seed, str(resolve_device(device, "--device")), out, sources)
    results = run_benchmark(run_, echo=lambda line: typer.echo(line))
    typer.echo(
        f"final accuracy {100 * results['final_accuracy']:.2f}%  mean {100 * results['mean_accuracy']:.2f}%  "
        f"wall {results['wall_seconds'] / 60:.1f} min  -> {out / 'results.json'}"
    )


@bench_app.command("compare")
def bench_compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or results JSON files).", metavar="RUN")],
    out: Annotated[Optional[Path], typer.Option(help="PNG to write.")] = Path("runs/bench-compare.png"),
) -> None:
    """Plot accuracy over experiences (one line per run) and print a markdown table."""
    from cl_agent.comparison import load_results, markdown_table, method_scenario_table, plot_runs

    results = [load_results(p) for p in runs]
    typer.echo(markdown_table(results))
    typer.echo("\nFinal accuracy (%), method x scenario (mean when all three scenarios are there):\n")
    typer.echo(method_scenario_table(results))
    if out is not None:
        typer.echo(f"\nplot: {plot_runs(results, out)}")


# --------------------------------------------------------------------------- keys


@keys_app.command("make")
def keys_make(
    directory: Annotated[Path, typer.Argument(help="Folder to write the key pair into.", metavar="DIRECTORY")],
    name: Annotated[str, typer.Option(help="Base name of the key files.")] = "agent",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair of that name.")] = False,
) -> None:
    """Create a CURVE key pair (NAME.key_secret, NAME.key) for the agent or a client; an existing pair is kept unless --force."""
    from cl_agent.security import make_keypair

    try:
        public, secret = make_keypair(directory, name, force=force)
    except CLAgentError as e:
        fail(str(e))
    typer.echo(f"public key: {public}\nsecret key: {secret}")


# --------------------------------------------------------------------------- entry point


def main() -> None:
    try:
        app()
    except ConfigError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(EXIT_ERROR)
    except CLAgentError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(exit_code(e))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
