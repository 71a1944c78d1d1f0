"""The master <-> child wire: JSON lines, and connections passed with SCM_RIGHTS."""

from __future__ import annotations

import os
import socket

from supervisor.channel import Channel, pair
from tests.harness import wait_until


def test_a_connection_passed_over_the_channel_still_reaches_its_client():
    master_end, child_end = pair()
    master, child = Channel(master_end), Channel(child_end)
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    assert child.send_fd(accepted.fileno(), t="handoff")
    accepted.close()  # the sender's copy is gone: only the passed descriptor keeps it open
    messages = wait_until(lambda: master.receive(), message="handoff message")
    assert messages == [{"t": "handoff"}] and len(master.fds) == 1
    adopted = socket.socket(fileno=master.fds.popleft())
    adopted.sendall(b"served by the adopter")
    assert client.recv(100) == b"served by the adopter"
    for s in (adopted, client, server):
        s.close()


def test_descriptors_left_unclaimed_are_closed_with_the_channel():
    master_end, child_end = pair()
    master = Channel(master_end)
    r, w = os.pipe()
    Channel(child_end).send_fd(r, t="handoff")
    os.close(r)
    wait_until(lambda: master.receive(), message="message")
    (leftover,) = master.fds
    master.close()
    try:
        os.fstat(leftover)
        raise AssertionError("descriptor still open")
    except OSError:
        pass
    os.close(w)
