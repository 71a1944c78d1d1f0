"""A generation's zygote (--preload): imports the app once, then forks the generation's workers.

Life: forked by the master -> reset signals and fds -> import the app exactly as a worker
does (a failure is reported as `BootError` and the zygote exits 3: a failed boot of its
generation) -> `gc.freeze()` so the imported heap stays shared copy-on-write -> report
`ZygoteReady` (naming any thread alive besides the main one: it would not exist in the
workers) -> fork a worker for each `Fork` the master sends, until the master kills it (its
generation is retired) or goes away (EOF on the channel).

Each worker is forked twice (zygote -> short-lived intermediate -> worker): the
intermediate exits at once, so the worker is re-parented to the master (PID 1 or a child
subreaper), which reaps it and signals it like any worker, and a zygote that dies takes no
worker with it.  The worker waits until it is the master's child, then runs the normal
worker path with the app already imported (`worker.main.run(..., preloaded=...)`), so its
parent-death signal and lifeline are tied to the master.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import threading
from dataclasses import replace
from typing import Any, NoReturn

import psutil

from supervisor import logs, proc, proto
from supervisor.channel import Channel
from supervisor.worker import main as worker
from supervisor.worker.app import code_fingerprint, interface_of, load_app, prepare_import
from supervisor.worker.spec import WorkerSpec

FORK_WAIT = 10.0  # the intermediate process only forks and writes a pid: this is generous
ADOPTION_WAIT = 10.0  # a worker waits this long to become the master's child
IDLE_WAIT = 60.0  # the zygote looks at its parent at least this often while idle


def run(spec: WorkerSpec, listeners: list[socket.socket], chan_sock: socket.socket) -> NoReturn:
    """The whole life of a zygote, in the child after fork.  Never returns."""
    code = 1
    try:
        code = _run(spec, listeners, chan_sock)
    finally:
        os._exit(code)


def _run(spec: WorkerSpec, listeners: list[socket.socket], chan_sock: socket.socket) -> int:
    proc.after_fork({chan_sock.fileno(), spec.lifeline_fd, *(s.fileno() for s in listeners)})
    proc.set_title(f"zygote g{spec.generation}")
    # Nothing to drain: the zygote goes with the master (its workers have their own lifeline).
    proc.die_with_parent(spec.master_pid, signal.SIGKILL)
    logs.configure(spec.log_level, spec.log_format, role="zygote", generation=spec.generation)
    log = logs.get()
    os.environ.update(spec.env)
    code_dir = os.path.realpath(spec.chdir) if spec.chdir else os.getcwd()
    if spec.chdir:
        os.chdir(code_dir)
    prepare_import(code_dir)
    chan = Channel(chan_sock, queue_sends=False)
    app_or_error = load_app(spec.target)
    if isinstance(app_or_error, str):
        return worker._boot_failed(log, chan, app_or_error)
    kind = interface_of(app_or_error, spec.interface, spec.target)
    if isinstance(kind, str):
        return worker._boot_failed(log, chan, kind)
    # Everything imported so far is permanent: the collector never touches it again, so its
    # pages stay shared with every worker forked below.
    gc.freeze()
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    ours = {chan_sock.fileno(), *(s.fileno() for s in listeners)}
    code = code_fingerprint(code_dir)
    chan.send(proto.ZygoteReady(code, threads, _connections(ours)))
    # The workers import from the directory the zygote imported from, even if a symlink moved.
    template = replace(spec, chdir=code_dir if spec.chdir else None)
    return _serve(template, worker.Preloaded(*kind, code), listeners, chan, log)


def _connections(ours: set[int]) -> list[str]:
    """The peers of connected sockets the import left open (a database, a cache): every worker
    forked from here would share each of them, and their traffic would interleave."""
    try:
        found = psutil.Process().net_connections(kind="all")
    except (psutil.Error, OSError):
        return []
    peers = set()
    for conn in found:
        if conn.fd in ours or not conn.raddr:
            continue
        peer = conn.raddr
        peers.add(f"{peer.ip}:{peer.port}" if hasattr(peer, "ip") else str(peer))
    return sorted(peers)


def _serve(spec: WorkerSpec, kind: worker.Preloaded, listeners: list[socket.socket], chan: Channel,
           log: Any) -> int:
    dump_fd = -1
    exiting: dict[int, int] = {}  # pidfd -> pid of an intermediate process, reaped once it exited
    while True:
        ready, _, _ = select.select([chan.fileno(), *exiting], [], [], IDLE_WAIT)
        if not ready:
            if os.getppid() != spec.master_pid:
                return 0
            continue
        for fd in [fd for fd in ready if fd in exiting]:
            _reap(exiting.pop(fd))
            os.close(fd)
        if chan.fileno() not in ready:
            continue
        for received in chan.receive():
            message = received.message
            if isinstance(message, proto.ForkPipe) and received.fd is not None:
                if dump_fd >= 0:
                    os.close(dump_fd)
                dump_fd = received.fd
            elif isinstance(message, proto.Fork) and received.fd is not None:
                pid, error = _fork_worker(replace(spec, slot=message.slot, dump_fd=dump_fd), kind,
                                          listeners, received.fd, chan, exiting)
                os.close(received.fd)
                if dump_fd >= 0:
                    os.close(dump_fd)
                dump_fd = -1
                if error:
                    log.error("fork_failed", worker=message.slot, error=error)
                chan.send(proto.Forked(message.slot, pid, error))
            elif received.fd is not None:
                os.close(received.fd)
        if chan.closed:
            return 0  # the master is gone


def _fork_worker(spec: WorkerSpec, kind: worker.Preloaded, listeners: list[socket.socket], chan_fd: int,
                 chan: Channel, exiting: dict[int, int]) -> tuple[int, str]:
    """Fork twice; the worker (the grandchild) becomes the master's child.  Its pid, or 0 and
    the error.  The intermediate is reaped later, once its pidfd (added to `exiting`) says it
    exited: the answer need not wait for its exit."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        return 0, str(exc)
    if pid == 0:  # the intermediate: fork the worker, say its pid, leave
        code = 1
        try:
            os.close(r)
            grandchild = os.fork()
            if grandchild == 0:
                os.close(w)
                chan.sock.detach()  # the zygote's channel: after_fork closes the descriptor
                _become_worker(spec, kind, listeners, chan_fd)
            os.write(w, f"{grandchild}\n".encode())
            code = 0
        except OSError as exc:
            os.write(w, f"error {exc}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    try:
        exiting[os.pidfd_open(pid)] = pid
        while b"\n" not in data and select.select([r], [], [], FORK_WAIT)[0]:
            chunk = os.read(r, 256)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    text = data.decode(errors="replace").strip()
    if text.isdigit():
        return int(text), ""
    return 0, text.removeprefix("error ") or "the intermediate process did not answer"


def _reap(pid: int) -> None:
    """Collect an intermediate process that exited."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _become_worker(spec: WorkerSpec, kind: worker.Preloaded, listeners: list[socket.socket],
                   chan_fd: int) -> NoReturn:
    try:
        _await_adoption(spec.master_pid)
        sock = socket.socket(fileno=chan_fd)
    except BaseException:
        os._exit(1)
    worker.run(spec, listeners, sock, preloaded=kind)


def _await_adoption(master_pid: int) -> None:
    """Wait until the intermediate has exited, so that we are the master's child and the
    worker's parent-death signal (set by the worker path) is tied to the master.  Were we
    re-parented elsewhere (the master is gone, or is no subreaper), that check ends us."""
    intermediate = os.getppid()
    if intermediate == master_pid:
        return
    try:
        fd = os.pidfd_open(intermediate)
    except OSError:
        return  # gone already
    try:
        select.select([fd], [], [], ADOPTION_WAIT)
    finally:
        os.close(fd)
