"""The master <-> child wire: typed messages, connections passed with SCM_RIGHTS, and a
master end that never blocks."""

from __future__ import annotations

import os
import socket

from supervisor import proto
from supervisor.channel import OUTBOX_LIMIT, Channel, pair
from tests.harness import wait_until


def ends() -> tuple[Channel, Channel]:
    master_end, child_end = pair()
    return Channel(master_end, queue_sends=True), Channel(child_end, queue_sends=False)


def test_a_connection_passed_over_the_channel_still_reaches_its_client():
    master, child = ends()
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    assert child.send(proto.Handoff(), fd=accepted.fileno())
    accepted.close()  # the sender's copy is gone: only the passed descriptor keeps it open
    (received,) = wait_until(lambda: master.receive(), message="handoff message")
    assert received.message == proto.Handoff() and received.fd is not None
    adopted = socket.socket(fileno=received.fd)
    adopted.sendall(b"served by the adopter")
    assert client.recv(100) == b"served by the adopter"
    for s in (adopted, client, server):
        s.close()


def test_descriptors_left_unclaimed_are_closed_with_the_channel():
    master_end, child_end = pair()
    master = Channel(master_end, queue_sends=True)
    r, w = os.pipe()
    child_end.sendall(b"x")  # bytes that are not a message; the descriptor rides along
    socket.send_fds(child_end, [b"garbage\n"], [r])
    os.close(r)
    wait_until(lambda: master.receive() == [] and master._fds, message="descriptor")
    (leftover,) = master._fds
    master.close()
    try:
        os.fstat(leftover)
        raise AssertionError("descriptor still open")
    except OSError:
        pass
    os.close(w)


def test_the_master_end_never_blocks_and_reports_a_peer_that_stops_reading():
    master, child = ends()
    big = proto.Note("x" * 60000)
    sent = 0
    while master.send(big):
        sent += 1
        assert sent * 60000 < 4 * OUTBOX_LIMIT, "the outbox is bounded"
    assert master.pending, "what the socket did not take waits in the outbox"
    # the child reads everything queued so far (the refused send's message was queued too; the
    # master treats that peer as stuck and kills it), then the master can flush again
    got = 0
    while got < sent + 1:
        got += len(wait_until(lambda: child.receive(), message="notes"))
        assert master.flush()
    assert got == sent + 1 and not master.pending


def test_a_descriptor_queued_in_the_outbox_survives_the_senders_close():
    master, child = ends()
    filler = proto.Note("y" * 60000)
    while master.send(filler) and not master.pending:
        pass
    r, w = os.pipe()
    master.send(proto.Adopt(), fd=r)
    os.close(r)  # the caller's copy: the outbox holds its own
    adopted = None
    while adopted is None:
        for received in wait_until(lambda: child.receive(), message="messages"):
            if received.fd is not None:
                adopted = received.fd
        master.flush()
    os.write(w, b"ok")
    assert os.read(adopted, 2) == b"ok"
    for fd in (adopted, w):
        os.close(fd)


def test_a_send_to_a_closed_peer_fails():
    master, child = ends()
    child.close()
    assert not master.send(proto.StartAccepting())
