"""Importing the app in a worker: from the code directory, with bytecode keyed precisely."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import importlib.machinery
import os
import sys
import traceback
from typing import Any, Callable


def prepare_import(code_dir: str) -> None:
    """Import from `code_dir` first, with bytecode keyed on the microsecond mtime."""
    sys.path.insert(0, code_dir)
    _use_precise_bytecode_cache(code_dir)


class _PreciseMtimeLoader(importlib.machinery.SourceFileLoader):
    """CPython validates a cached .pyc by the source's mtime in whole seconds and its size.
    A same-size edit within the same second (a one-character fix deployed right after the
    previous one) would then import the stale bytecode and serve the old code.  For the
    code directory we key the cache on the microsecond mtime instead."""

    def path_stats(self, path: str) -> dict[str, int]:
        st = os.stat(path)
        return {"mtime": (st.st_mtime_ns // 1000) & 0xFFFFFFFF, "size": st.st_size}


def _use_precise_bytecode_cache(code_dir: str) -> None:
    machinery = importlib.machinery
    finder_hook = machinery.FileFinder.path_hook(
        (machinery.ExtensionFileLoader, machinery.EXTENSION_SUFFIXES),
        (_PreciseMtimeLoader, machinery.SOURCE_SUFFIXES),
        (machinery.SourcelessFileLoader, machinery.BYTECODE_SUFFIXES))
    prefix = code_dir.rstrip(os.sep) + os.sep

    def hook(path: str) -> Any:
        real = os.path.realpath(path or ".")
        if real != code_dir and not real.startswith(prefix):
            raise ImportError("not in the code directory")  # let the default finder handle it
        return finder_hook(path)

    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()


def load_app(target: str) -> Callable | str:
    """Import the WSGI callable.  Returns it, or the error text (first line, then traceback)."""
    module_name, _, attr = target.partition(":")
    attr = attr or "application"
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return f"AttributeError: module {module_name!r} has no attribute {attr!r}"
    except BaseException as exc:  # noqa: BLE001 - any import failure is a boot failure
        first = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SyntaxError):
            first = f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
        return first + "\n" + traceback.format_exc()
    if not callable(obj):
        return f"TypeError: {target} is not callable"
    return obj


def code_fingerprint(code_dir: str) -> str:
    """What identifies the code this worker runs: every module it imported from the code
    directory, with its size and mtime, and the directory's real path (a symlink swap)."""
    prefix = code_dir.rstrip(os.sep) + os.sep
    digest = hashlib.sha1(code_dir.encode())
    for path in sorted({f for m in list(sys.modules.values())
                        if isinstance(f := getattr(m, "__file__", None), str) and f.startswith(prefix)}):
        try:
            st = os.stat(path)
        except OSError:
            continue
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def interface_of(app: Callable, wanted: str, target: str) -> tuple[str, Callable] | str:
    """("wsgi", app) or ("asgi", an ASGI 3 callable), or the boot error's text.

    auto: an `async def` function, or an object whose `__call__` is `async def`, is ASGI 3; a
    class whose instances have an `async def __call__` is ASGI 2 (a double callable: `cls(scope)`
    then `await instance(receive, send)`), run through a wrapper; anything else is WSGI.
    asgi: also a plain callable of one argument (ASGI 2) or of three (ASGI 3 returning an
    awaitable); one of two arguments (environ, start_response) is refused."""
    kind = _asgi_kind(app)
    if wanted == "wsgi":
        if kind is not None:
            return (f"TypeError: {target} is an ASGI {kind[-1]} application; run it with --interface asgi "
                    "(or auto), not --interface wsgi")
        return "wsgi", app
    if kind == "asgi3":
        return "asgi", app
    if kind == "asgi2":
        return "asgi", _asgi2(app)
    if wanted == "auto":
        return "wsgi", app
    arity = _positional_arity(app)
    if arity == 1:
        return "asgi", _asgi2(app)
    if arity == 3:
        return "asgi", app
    return (f"TypeError: {target} is not an ASGI application (a synchronous callable of "
            f"{arity if arity is not None else 'unknown'} arguments; a WSGI app? use --interface wsgi or auto)")


def _asgi_kind(app: Any) -> str | None:
    if inspect.iscoroutinefunction(app):
        return "asgi3"
    if inspect.isclass(app):
        return "asgi2" if inspect.iscoroutinefunction(getattr(app, "__call__", None)) else None
    if not inspect.isfunction(app) and not inspect.ismethod(app):
        call = getattr(type(app), "__call__", None)
        if call is not None and inspect.iscoroutinefunction(call):
            return "asgi3"
    return None


def _positional_arity(app: Any) -> int | None:
    try:
        params = inspect.signature(app).parameters.values()
    except (TypeError, ValueError):
        return None
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)


def _asgi2(app: Callable) -> Callable:
    """An ASGI 2 double callable as an ASGI 3 app."""

    async def asgi3(scope: Any, receive: Any, send: Any) -> None:
        instance = app(scope)
        await instance(receive, send)

    return asgi3
