"""Importing the app in a worker: from the code directory, with bytecode keyed precisely."""

from __future__ import annotations

import hashlib
import importlib
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
