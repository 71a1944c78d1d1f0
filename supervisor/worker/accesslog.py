"""Access log lines and request ids.

`writer` makes what `Adapter.finish` calls once per request: the structlog `request` event
(json), or Apache's combined line with the duration and the request id appended (combined),
written straight to stdout with one os.write, so that the lines of all workers never
interleave.  `RequestIds` hands out fresh request ids; `valid_id` tells a client's from junk.

Values are bounded: each field is cut to a limit, so that a combined line stays under
PIPE_BUF (4096 bytes, the size of an atomic pipe write) whatever the request.  In the
combined format every byte that could end a field or a line is escaped as `\\xHH`, as Apache's
ap_escape_logitem does: `"`, `\\`, every control character (CR, LF, TAB...), DEL and every
non-ASCII byte; in the unquoted fields (client address, request id) the space too.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable

from supervisor.logs import _LineWriter

if TYPE_CHECKING:
    from supervisor.worker.wsgi import Exchange

# The longest logged values, in characters (escaped ones in the combined format).  With the
# separators and the fixed fields a combined line stays under 3.8 KB: one atomic write.
TARGET, REFERER, AGENT, ID, REMOTE = 2048, 768, 512, 256, 64

_QUOTED_UNSAFE = re.compile(rb'[^ !#-\[\]-~]+')  # inside "...": all but printable ASCII, " and \
_WORD_UNSAFE = re.compile(rb'[^!#-\[\]-~]+')  # unquoted fields: the space as well
_HEX = [b"\\x%02x" % byte for byte in range(256)]
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _hex(match: re.Match[bytes]) -> bytes:
    return b"".join([_HEX[byte] for byte in match.group()])


def escape(value: str | bytes, limit: int, unsafe: re.Pattern[bytes] = _QUOTED_UNSAFE) -> str:
    """`value` as one field of a combined line: escaped, at most `limit` characters, never
    ending inside an escape.  A str is taken as latin-1, like the environ's values (PEP 3333)."""
    data = value[:limit] if isinstance(value, bytes) else value[:limit].encode("latin-1", "backslashreplace")
    text = unsafe.sub(_hex, data).decode("ascii")
    if len(text) > limit:
        text = text[:limit]
        cut = text.rfind("\\", limit - 3)  # an escape (4 characters) starting here was cut short
        if cut >= 0:
            text = text[:cut]
    return text


def _word(value: str | None, limit: int) -> str:
    return escape(value, limit, _WORD_UNSAFE) if value else "-"


def _quoted(value: str | None, limit: int) -> str:
    return "-" if value is None else escape(value, limit)


def _cut(value: Any, limit: int) -> Any:
    return value[:limit] if isinstance(value, str) else value


class Json:
    """The structlog `request` event (JSON escapes every value itself)."""

    def __init__(self, info: Callable[..., None]) -> None:
        self.info = info

    def __call__(self, ex: Exchange, seconds: float) -> None:
        environ = ex.environ
        self.info("request", method=environ.get("REQUEST_METHOD"), path=_cut(environ.get("PATH_INFO"), TARGET),
                  query=_cut(environ.get("QUERY_STRING"), TARGET), protocol=environ.get("SERVER_PROTOCOL"),
                  status=ex.code, bytes=ex.written, duration=round(seconds, 6), remote=environ.get("REMOTE_ADDR"),
                  user_agent=_cut(environ.get("HTTP_USER_AGENT"), AGENT),
                  referer=_cut(environ.get("HTTP_REFERER"), REFERER), request_id=_cut(ex.request_id, ID))


class Combined:
    """`REMOTE - - [TIME] "REQUEST" STATUS BYTES "REFERER" "USER-AGENT" SECONDS REQUEST-ID`:
    the request line as it came (method and target escaped), the time in UTC when the response
    ended, `-` for no body bytes, no Referer or User-Agent field, no request id."""

    def __init__(self) -> None:
        self.out = _LineWriter()
        self.stamp = (0, "")  # (second, its text): strftime per request would cost more than the line

    def __call__(self, ex: Exchange, seconds: float) -> None:
        environ, req = ex.environ, ex.req
        self.out.msg(f'{_word(environ.get("REMOTE_ADDR"), REMOTE)} - - [{self._now()}] '
                     f'"{escape(req.method + b" " + req.url, TARGET)} HTTP/{req.version}" {ex.code} '
                     f'{ex.written or "-"} "{_quoted(environ.get("HTTP_REFERER"), REFERER)}" '
                     f'"{_quoted(environ.get("HTTP_USER_AGENT"), AGENT)}" {seconds:.6f} {_word(ex.request_id, ID)}')

    def _now(self) -> str:
        now = int(time.time())
        second, text = self.stamp
        if now != second:
            t = time.gmtime(now)  # no %b: the month's name must not follow the app's locale
            text = (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:"
                    f"{t.tm_sec:02d} +0000")
            self.stamp = (now, text)  # one store: app threads never see a second with another's text
        return text


def writer(fmt: str, info: Callable[..., None]) -> Callable[[Exchange, float], None]:
    """The access log of --access-log-format `fmt`; `info` logs a structlog event."""
    return Combined() if fmt == "combined" else Json(info)


# A client's X-Request-ID is kept when it is 1 to 200 printable ASCII characters with no space,
# quote or backslash: it can then go in a response head and a log line as it is.
valid_id = re.compile(r'[!#-\[\]-~]{1,200}').fullmatch
BATCH = 64


class RequestIds:
    """Fresh request ids: 32 lowercase hex digits from os.urandom, drawn BATCH at a time (one
    getrandom call per BATCH requests, cheaper than random.getrandbits per request, and
    unique across workers whatever the app does to `random`).  The pool is refilled while it
    holds more ids than app threads can take at once, so `new` never finds it empty."""

    def __init__(self, threads: int) -> None:
        self.pool: list[str] = []
        self.low = threads

    def new(self) -> str:
        pool = self.pool
        if len(pool) <= self.low:
            digits = os.urandom(16 * BATCH).hex()
            pool.extend([digits[i:i + 32] for i in range(0, len(digits), 32)])
        return pool.pop()
