"""tools/send_labeled.py interrupted with a message stored and not yet acked, then run again with the arguments
its summary names: every image ends up stored once (the resent message keeps its (sender, seq))."""

import hashlib
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import zmq

from cl_agent.experience import ExperienceStore
from ingest_support import images, make_service

TOOL = Path(__file__).resolve().parents[1] / "tools" / "send_labeled.py"
SIZE = 16


class Relay:
    """Between the tool and the agent: takes the tool's messages one at a time, passes each to the agent, and
    hands the agent's answer back to the tool or keeps it (the message is then stored and not acked)."""

    def __init__(self, bind, agent_endpoint: str):
        self.endpoint, self.front = bind(zmq.ROUTER)
        self.back = zmq.Context.instance().socket(zmq.DEALER)
        self.back.linger = 0
        self.back.connect(agent_endpoint)

    def relay(self, answer=True) -> dict:
        """One message of the tool through to the agent; the agent's answer goes back to the tool if ``answer``
        (or ``answer(header)`` of the tool's message) holds. Returns the agent's answer."""
        assert self.front.poll(30_000), "no message from the tool"
        route, empty, *body = self.front.recv_multipart()
        self.back.send_multipart([b"", *body])
        assert self.back.poll(30_000), "no answer from the agent"
        reply = self.back.recv_multipart()
        if answer(json.loads(body[0])) if callable(answer) else answer:
            self.front.send_multipart([route, *reply])
        return json.loads(reply[-1])

    def close(self) -> None:
        self.back.close()


def _tree(root: Path, *, pngs: int = 0, per_class: int = 6) -> int:
    """Two classes of distinct noise images, ``pngs`` of each class's as PNG; returns how many images."""
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images(per_class, SIZE, seed=c)):
            cv2.imwrite(str(root / name / f"{i:02d}.{'png' if i < pngs else 'jpg'}"), image)
    return 2 * per_class


def _interrupt(tool: subprocess.Popen) -> tuple[str, str]:
    tool.send_signal(signal.SIGINT)
    out, err = tool.communicate(timeout=30)
    assert tool.returncode == 130, err
    assert "Traceback" not in err
    return out, err


def _resume_arguments(out: str) -> list[str]:
    found = re.search(r"run again with the same arguments and (.*?) \(a message", out)
    assert found, out
    return shlex.split(found.group(1))


def _stored(workdir: Path) -> list[str]:
    """Digests of the images of experience 0, one per stored image."""
    labeled, _, _ = ExperienceStore(workdir).load(0).decode(SIZE)
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in labeled]


@pytest.mark.parametrize("options, answered", [
    # one message at a time, the 4th stored by the agent and its ack lost to Ctrl-C
    (["--batch", "1", "--window", "1"], [True] * 3 + [False]),
    # batches of 3 (PNG and JPEG in them: two messages per batch), 3 in flight, shuffled, under a --limit: the
    # first message's ack is kept, later ones answered, so the acks are not a prefix of what was sent
    (["--batch", "3", "--window", "3", "--shuffle", "4", "--limit", "11"], [False, True, True, True, True]),
])
def test_the_run_again_the_summary_names_stores_every_image_once(tmp_path, bound_socket, options, answered):
    root = tmp_path / "data"
    count = _tree(root, pngs=2 if "--shuffle" in options else 0)
    limit = int(options[options.index("--limit") + 1]) if "--limit" in options else count
    workdir = tmp_path / "agent"
    with make_service(workdir) as service:
        relay = Relay(bound_socket, service.endpoints["labeled"])
        try:
            command = [sys.executable, str(TOOL), str(root), "--timeout", "60", *options]
            tool = subprocess.Popen([*command, "--endpoint", relay.endpoint], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            try:
                replies = [relay.relay(answer) for answer in answered]
            finally:
                out, _ = _interrupt(tool)
        finally:
            relay.close()
        assert all(reply["kind"] == "ack" for reply in replies)  # stored, the answers in `answered` not passed on
        assert re.search(rf"{answered.count(True)} batches, .* (\d+) sent and not acked", out), out
        again = _resume_arguments(out)
        assert "--sender" in again and "--seq-base" in again and "--skip" in again
        if "--limit" in options:
            skip = int(again[again.index("--skip") + 1])
            assert skip + int(again[again.index("--limit") + 1]) == limit  # the same end of the listing
        rerun = subprocess.run([*command, *again, "--endpoint", service.endpoints["labeled"], "--end-experience"],
                               capture_output=True, text=True, timeout=60)
        counters = service.counters()
    assert rerun.returncode == 0, rerun.stderr
    stored = _stored(workdir)
    assert len(stored) == limit == counters["labeled_images_acked"]
    assert len(set(stored)) == limit  # each image once
    assert counters["labeled_duplicates"] >= 1 and "acked as duplicates" in rerun.stdout


def test_end_experience_after_the_agent_cut_by_count_says_nothing_was_left(tmp_path):
    root = tmp_path / "data"
    count = _tree(root, per_class=2)
    with make_service(tmp_path / "agent", experience={"labeled_samples": count}) as service:
        result = subprocess.run([sys.executable, str(TOOL), str(root), "--endpoint", service.endpoints["labeled"],
                                 "--batch", str(count), "--end-experience"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "end of experience: nothing to cut: the open experience is empty" in result.stdout
    assert "already cut it" in result.stdout


def test_the_rest_of_a_batch_refused_for_one_file_keeps_its_seq_on_the_run_again(tmp_path, bound_socket):
    """The agent refuses a batch for a truncated JPEG; the rest, sent again under the batch's seq, is stored and
    its ack lost to Ctrl-C. The run again sends the batch under that seq: acked as a duplicate, nothing twice."""
    root = tmp_path / "data"
    count = _tree(root, per_class=3)
    whole = cv2.imencode(".jpg", images(1, SIZE, 9)[0])[1].tobytes()
    (root / "cat" / "00b.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # its header intact: the agent refuses it
    workdir = tmp_path / "agent"
    with make_service(workdir) as service:
        relay = Relay(bound_socket, service.endpoints["labeled"])
        try:
            command = [sys.executable, str(TOOL), str(root), "--batch", "4", "--window", "1", "--timeout", "60"]
            tool = subprocess.Popen([*command, "--endpoint", relay.endpoint], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            try:
                refusal = relay.relay()
                while True:  # the next batch may come first: the tool sends the rest once it has read the nack
                    rest = relay.relay(answer=lambda header: header["seq"] != refusal["seq"])
                    if rest["seq"] == refusal["seq"]:
                        break
            finally:
                out, err = _interrupt(tool)
        finally:
            relay.close()
        assert refusal["kind"] == "nack" and refusal["reason"] == "decode_failed"
        assert rest["kind"] == "ack" and rest["seq"] == refusal["seq"] and rest["accepted"] == 3
        assert "00b.jpg refused: decode_failed" in err
        rerun = subprocess.run([*command, *_resume_arguments(out), "--endpoint", service.endpoints["labeled"],
                                "--end-experience"], capture_output=True, text=True, timeout=60)
        counters = service.counters()
    assert rerun.returncode == 0, rerun.stderr
    stored = _stored(workdir)
    assert len(stored) == len(set(stored)) == count == counters["labeled_images_acked"]


def test_the_first_ctrl_c_waits_for_the_ack_of_the_message_in_flight(tmp_path, bound_socket):
    root = tmp_path / "data"
    _tree(root, per_class=3)
    with make_service(tmp_path / "agent") as service:
        relay = Relay(bound_socket, service.endpoints["labeled"])
        try:
            tool = subprocess.Popen([sys.executable, str(TOOL), str(root), "--batch", "1", "--window", "1",
                                     "--timeout", "60", "--endpoint", relay.endpoint],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                relay.relay()
                assert relay.front.poll(30_000)  # the 2nd message is in flight
                tool.send_signal(signal.SIGINT)
                time.sleep(0.2)  # the ack comes a moment after the signal, well within the tool's wait (1 s)
                relay.relay()
            finally:
                out, err = tool.communicate(timeout=30)
        finally:
            relay.close()
    assert tool.returncode == 130, err
    assert "interrupted: 2 images acked in 2 batches" in out
    assert "0 sent and not acked" in out and "--skip 2" in out
