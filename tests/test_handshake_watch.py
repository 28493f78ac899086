"""HandshakeWatch, the one reader of the clients' socket monitors: a request socket's watch (LabeledClient,
control_status) and a frame socket's (FrameClient) read the same events with their own refusal rules."""

import pytest
import zmq

from cl_agent.client import FrameClient, HandshakeWatch, NotConnected, auth_rejected_message, connect
from cl_agent.config import CurveSection
from cl_agent.security import make_keypair
from ingest_support import make_service, wait_until

REJECTED = "rejected this client's CURVE key"


def test_an_unauthorized_key_refuses_a_request_socket_and_is_noted_by_a_frame_socket(tmp_path):
    server_public, server_secret = make_keypair(tmp_path / "server", "agent")
    make_keypair(tmp_path / "clients", "robot")
    _, rogue_secret = make_keypair(tmp_path / "rogue", "rogue")
    curve = CurveSection(enabled=True, server_secret_key=str(server_secret), authorized_clients_dir=str(tmp_path / "clients"))
    rogue = {"curve_secret_key": rogue_secret, "curve_server_key": server_public}
    with make_service(tmp_path / "agent", ingest={"curve": curve}) as service:
        labeled = service.endpoints["labeled"]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        watch = HandshakeWatch(sock, labeled, curve=True)
        try:
            connect(sock, labeled, (rogue_secret, server_public))
            assert wait_until(lambda: watch.read() is not None)  # a request socket: a refusal, sending cannot help
            assert watch.refusal == auth_rejected_message(labeled)
        finally:
            watch.close()
            sock.close(linger=0)

        # A frame socket: libzmq keeps retrying the handshake, so no PeerRefused; the rejection is what
        # require_connected names when no connection came.
        with FrameClient(service.endpoints["frames"], "rogue-cam", **rogue) as frames:
            assert wait_until(lambda: not frames.wait_connected(0.05) and REJECTED in frames.not_connected_message(1))
            assert not frames.connected
            with pytest.raises(NotConnected, match=REJECTED):
                frames.require_connected(0.1)
