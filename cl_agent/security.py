"""Optional CURVE encryption and client authentication for the agent's endpoints.

Keys live in files made by ``cl-agent keys make DIR --name NAME`` (ZeroMQ's
certificate format: ``NAME.key`` holds the public key, ``NAME.key_secret`` both).
The agent loads its secret key file; a client loads its own secret key file and
the agent's public key file. Only clients whose public key file sits in the
authorized folder can connect; any other connection is dropped during the
handshake, so an unauthorized client delivers nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from cl_agent.config import CurveSection, endpoint_problem
from cl_agent.errors import CLAgentError


def make_keypair(directory: str | Path, name: str = "agent", *, force: bool = False) -> tuple[Path, Path]:
    """Create ``NAME.key`` (public) and ``NAME.key_secret`` in ``directory``; returns (public_path, secret_path).

    An existing key file of that name is a CLAgentError unless ``force``: replacing a
    secret key locks out every peer that trusts the old public key. The pair is written
    in a private temporary folder and moved into place, so the secret key is never
    readable by others, even for a moment.
    """
    if not name or "/" in name or name.startswith("."):
        raise CLAgentError(f"key name {name!r} must be a plain file name")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CLAgentError(f"cannot write keys into {directory}: it is a file, not a folder")
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    existing = [str(p) for p in (public_path, secret_path) if p.exists() or p.is_symlink()]
    if existing and not force:
        files = f"key file {existing[0]} already exists" if len(existing) == 1 else f"key files {' and '.join(existing)} already exist"
        raise CLAgentError(f"{files}: not replacing them (peers trust the old public key; pass --force to replace them anyway)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=f".{name}-") as private:  # mode 0700
            public, secret = zmq.auth.create_certificates(private, name)
            Path(secret).chmod(0o600)
            os.replace(secret, secret_path)
            os.replace(public, public_path)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(directory) else ""
        raise CLAgentError(f"cannot write keys into {directory}: {e.strerror or e}{where}") from None
    return public_path, secret_path


def load_keys(path: str | Path, *, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys from a key file; a missing or unreadable file is a CLAgentError."""
    path = Path(path)
    if not path.is_file():
        raise CLAgentError(f"CURVE key file not found: {path}")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as e:
        raise CLAgentError(f"CURVE key file {path} is not readable: {e}") from None
    if need_secret and not secret:
        raise CLAgentError(f"CURVE key file {path} has no secret key (use the .key_secret file)")
    return public, secret


def client_keys_problem(secret_key: str | Path | None, server_key: str | Path | None) -> str | None:
    """Why a client's ``--curve-secret`` (its secret key file) and ``--curve-server`` (the agent's public
    key file) cannot be used; None when both are given and readable, or neither is."""
    if (secret_key is None) != (server_key is None):
        return "--curve-secret and --curve-server go together (this client's secret key, the agent's public key)"
    for option, path, need_secret in (("--curve-secret", secret_key, True), ("--curve-server", server_key, False)):
        if path is not None:
            try:
                load_keys(path, need_secret=need_secret)
            except CLAgentError as e:
                return f"{option}: {e}"
    return None


def add_client_key_options(parser: argparse.ArgumentParser) -> None:
    """``--curve-secret`` and ``--curve-server`` for a command-line tool that connects to the agent."""
    parser.add_argument("--curve-secret", type=Path, default=None,
                        help="this client's CURVE secret key file (default: none, no CURVE)")
    parser.add_argument("--curve-server", type=Path, default=None,
                        help="the agent's CURVE public key file (default: none, no CURVE)")


def client_options_problem(endpoint: str, secret_key: str | Path | None, server_key: str | Path | None,
                           option: str = "--endpoint") -> str | None:
    """Why a client's endpoint ``option`` or its CURVE key files cannot be used, naming the option; None if they can."""
    problem = endpoint_problem(endpoint)
    if problem:
        return f"{option} {endpoint!r}: {problem}"
    return client_keys_problem(secret_key, server_key)


def check_client_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """End the tool with a usage error naming the option when ``--endpoint`` or the CURVE key files cannot be used."""
    problem = client_options_problem(args.endpoint, args.curve_secret, args.curve_server)
    if problem:
        parser.error(problem)


def start_authenticator(context: zmq.Context, curve: CurveSection) -> ThreadAuthenticator:
    """Allow CURVE clients whose public keys are in ``curve.authorized_clients_dir``; call .stop() when done."""
    folder = Path(curve.authorized_clients_dir)
    if not folder.is_dir():
        raise CLAgentError(f"ingest.curve.authorized_clients_dir = {str(folder)!r}: not a folder (it holds the public key files of the clients allowed to connect)")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(folder))
    return auth


def make_server(socket: zmq.Socket, curve: CurveSection) -> None:
    """Turn ``socket`` (before bind) into a CURVE server with the agent's keys."""
    public, secret = load_keys(curve.server_secret_key, need_secret=True)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def make_client(socket: zmq.Socket, client_secret_key: str | Path, server_public_key: str | Path) -> None:
    """Turn ``socket`` (before connect) into a CURVE client of the server whose public key file is given."""
    public, secret = load_keys(client_secret_key, need_secret=True)
    server_public, _ = load_keys(server_public_key, need_secret=False)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public
