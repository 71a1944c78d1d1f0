"""Listening sockets: parsed from --bind, bound once by the master (or inherited from systemd
or another parent: socket activation), inherited by workers over fork."""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import MutableMapping


FD = -1  # Address.family of an inherited descriptor (fd://N): its real family is the socket's
SD_LISTEN_FDS_START = 3  # systemd passes its sockets from this descriptor on


@dataclass(frozen=True)
class Address:
    family: int
    host: str  # for AF_UNIX: the path
    port: int  # for FD: the descriptor

    def __str__(self) -> str:
        if self.family == FD:
            return f"fd://{self.port}"
        if self.family == socket.AF_UNIX:
            return f"unix:{self.host}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class BindError(Exception):
    """A socket cannot be bound.  Reported as one line, exit 4."""


def parse_address(text: str) -> Address:
    """HOST:PORT, [IPv6]:PORT, :PORT (all interfaces), unix:/path or fd://N (an inherited
    listening socket).  ValueError if malformed."""
    text = text.strip()
    if text.startswith("fd://"):
        number = text[5:]
        if not number.isdigit() or int(number) < 3:
            raise ValueError(f"{text!r}: fd://N needs a descriptor number of 3 or more")
        return Address(FD, "", int(number))
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError(f"{text!r}: empty unix socket path")
        return Address(socket.AF_UNIX, path, 0)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        family, port_text = socket.AF_INET6, rest[1:]
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT, [IPv6]:PORT or unix:/path")
        host = host or "0.0.0.0"
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
        family = socket.AF_INET
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return Address(family, host, int(port_text))


DEFER_ACCEPT = 1  # seconds: a TCP connection reaches accept() once its first bytes arrived


def bind(address: Address, backlog: int, defer_accept: bool = False) -> socket.socket:
    """Bind and listen (or adopt an inherited socket, fd://N).  Raises BindError with a one-line reason.

    `defer_accept` (the HTTP listeners): the kernel hands over a connection only once its
    request began to arrive (or after DEFER_ACCEPT seconds), so a worker never holds a
    connection it cannot serve at once: connect-only clients cost it nothing, and a worker
    that a request crashes takes no unserved client down with it."""
    if address.family == FD:
        return adopt(address.port, defer_accept)
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        if address.family == socket.AF_UNIX:
            _remove_stale_unix_socket(address.host)
            sock.bind(address.host)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address.host, address.port))
            if defer_accept:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reason = {errno.EADDRINUSE: "address already in use", errno.EACCES: "permission denied",
                  errno.EADDRNOTAVAIL: "address not available on this host"}.get(exc.errno, exc.strerror)
        raise BindError(f"cannot bind {address}: {reason}") from None
    except socket.gaierror as exc:
        sock.close()
        raise BindError(f"cannot bind {address}: {exc.strerror}") from None
    # Workers must not inherit-then-exec it by accident, but they do inherit it over fork.
    sock.set_inheritable(False)
    return sock


def adopt(fd: int, defer_accept: bool = False) -> socket.socket:
    """An inherited descriptor that must be a listening stream socket (socket activation)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        why = "not an open descriptor" if exc.errno == errno.EBADF else "not a socket" \
            if exc.errno == errno.ENOTSOCK else exc.strerror
        raise BindError(f"cannot use fd://{fd}: {why}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise BindError(f"cannot use fd://{fd}: not a listening stream socket")
    if defer_accept and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
    sock.set_inheritable(False)  # as our own: inherited over fork, never across an exec
    return sock


def systemd_listeners(environ: MutableMapping[str, str], pid: int) -> tuple[list[int], dict[int, str]]:
    """The descriptors systemd passed (LISTEN_FDS, for this pid: LISTEN_PID), with their names
    (LISTEN_FDNAMES).  The variables are removed so that workers, the app and its children do
    not take the sockets for theirs (as sd_listen_fds(1) does)."""
    count, owner = environ.get("LISTEN_FDS", ""), environ.get("LISTEN_PID", "")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if not count.isdigit() or owner != str(pid):
        return [], {}
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
    return fds, {fd: name for fd, name in zip(fds, names) if name}


def bound_address(sock: socket.socket, requested: Address) -> Address:
    """The real address, e.g. the port the kernel picked for port 0 (or the address of an
    inherited socket)."""
    if requested.family == socket.AF_UNIX:
        return requested
    if requested.family == FD:
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            return Address(socket.AF_UNIX, name if isinstance(name, str) else repr(name), 0)
        return Address(sock.family, name[0], name[1])
    host, port = sock.getsockname()[:2]
    return Address(requested.family, host, port)


def unlink_socket_file(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse to touch anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise BindError(f"cannot bind unix:{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale
        return
    except OSError:
        return
    finally:
        probe.close()
    raise BindError(f"cannot bind unix:{path}: another process is listening on it")
