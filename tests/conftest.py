"""Shared test settings: tests run on the CPU with few threads, so the suite stays fast on 2 cores."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    yield


@pytest.fixture
def shared_dir() -> Path:
    """The read-only ../shared folder beside the checkout; tests that need it skip without it."""
    if not SHARED.is_dir():
        pytest.skip("../shared (datasets and scenarios) is not beside this checkout")
    return SHARED


@pytest.fixture
def curve_keys(tmp_path):
    """CURVE keys under ``tmp_path``: (the server's CurveSection authorizing the client "robot", the server's
    public key, robot's secret key, the secret key of "rogue", a client the server does not know)."""
    from cl_agent.config import CurveSection
    from cl_agent.security import make_keypair

    server_public, server_secret = make_keypair(tmp_path / "server", "agent")
    _, allowed_secret = make_keypair(tmp_path / "clients", "robot")
    _, rogue_secret = make_keypair(tmp_path / "rogue", "rogue")
    curve = CurveSection(enabled=True, server_secret_key=str(server_secret), authorized_clients_dir=str(tmp_path / "clients"))
    return curve, server_public, allowed_secret, rogue_secret


@pytest.fixture
def bound_socket():
    """Real ZeroMQ sockets bound to free loopback ports: ``bound_socket(zmq.PULL)`` -> (endpoint, socket);
    closed after the test."""
    import zmq

    sockets = []

    def bind(kind: int):
        sock = zmq.Context.instance().socket(kind)
        sock.linger = 0
        sockets.append(sock)
        return f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}", sock

    yield bind
    for sock in sockets:
        sock.close()
