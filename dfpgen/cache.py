"""Kernel and tuning cache: in memory, then on disk, content-addressed (docs/ARCHITECTURE.md §4).

Interface used by the rest of dfpgen (stable):

- ``kernel_key(fields: dict) -> str``: sha256 hex of canonical JSON of ``fields`` plus the
  schema version, generator hash and LLVM/llvmlite versions.
- ``get_or_build(fields: dict, build: Callable[[], bytes]) -> tuple[bytes, str]``: object code
  for ``fields``, from memory, disk, or ``build()``; the second item says where it came from
  (``"memory" | "disk" | "built"``).
- ``store_tuning(fields, value)`` / ``load_tuning(fields) -> dict | None``: tuning decisions
  (the chosen config and its measured timings), keyed like kernels minus the config.

Layout under :func:`cache_dir` (``$DFPGEN_CACHE_DIR``, else the platform user cache dir)::

    kernels/<key[:2]>/<key>.o      object code (ELF)
    kernels/<key[:2]>/<key>.json   metadata, written LAST: fields, symbol, size, sha256 of the
                                   object, compile seconds, created time
    tuning/<key[:2]>/<key>.json    fields + value

Every file is written to a temp file in the same directory and moved into place with
``os.replace`` (atomic on POSIX), under a ``filelock.FileLock`` per key, so two processes
building the same kernel both succeed and compile it once (the second waits, then loads).
An entry whose metadata is missing or unparseable, or whose object does not match the
recorded sha256, is treated as absent, rebuilt, and a :class:`dfpgen.CacheWarning` names
the file. When the directory cannot be written (read-only, full, not a directory), kernels
still compile in memory and one ``CacheWarning`` is issued per process.
``DFPGEN_CACHE=0`` (or ``off``/``no``/``false``) disables the disk layer.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import filelock
import platformdirs

from .env import flag, raw
from .errors import CacheWarning, warn
from .jit import llvm_versions
from .render import generator_hash

SCHEMA_VERSION = 1
ENV_DIR = "DFPGEN_CACHE_DIR"
ENV_CACHE = "DFPGEN_CACHE"
LOCK_TIMEOUT_S = 600.0  # longer than any single kernel compile; then build in memory

_mem: dict[str, bytes] = {}
_mem_tuning: dict[str, dict] = {}
_lock = threading.Lock()
_counts = {"built": 0, "disk": 0, "memory": 0}
_disk_warned = False


# ----------------------------------------------------------------------------- location
def cache_dir() -> Path:
    """The cache root: ``$DFPGEN_CACHE_DIR`` or ``platformdirs.user_cache_dir("dfpgen")``."""
    env = raw(ENV_DIR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("dfpgen"))


def disk_enabled() -> bool:
    """False when ``$DFPGEN_CACHE`` is ``0``, ``off``, ``no`` or ``false``; True when it is
    unset, empty, ``1``, ``on``, ``yes`` or ``true``. Raises :class:`dfpgen.DfpError` naming
    the variable for any other value."""
    return flag(ENV_CACHE, True)


def disk_status() -> tuple[bool, str]:
    """Whether kernels will really be kept on disk, and why not: ``(True, "")`` when the disk
    cache is enabled and a file can be written in :func:`cache_dir` (created if missing),
    ``(False, reason)`` otherwise (``$DFPGEN_CACHE`` off, or the directory not usable: a
    file, read-only, full). Used by ``dfpgen info``, which must not report a cache that the
    kernels would silently bypass."""
    if not disk_enabled():
        return False, f"disabled by ${ENV_CACHE}"
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".probe.", suffix=".tmp")
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return False, f"{root} is not usable ({_why(root, exc)})"
    return True, ""


def _why(root: Path, exc: OSError) -> str:
    # one reason, the same for `dfpgen info` and the warning: a path that exists but is not a
    # directory fails as FileExistsError in mkdir and NotADirectoryError below it
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                return "it is a file, not a directory" if p == root else f"{p} is a file, not a directory"
            break
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def counters() -> dict:
    """Kernel objects obtained in this process: ``{"built", "disk", "memory"}`` counts."""
    with _lock:
        return dict(_counts)


def forget_memory() -> None:
    """Drop the in-memory layer (tests; ``clear``). Loaded kernels stay loaded."""
    with _lock:
        _mem.clear()
        _mem_tuning.clear()


# ----------------------------------------------------------------------------- keys
def _canonical(fields: dict) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def _full_fields(fields: dict) -> dict:
    return {"schema": SCHEMA_VERSION, "generator": generator_hash(), **llvm_versions(), **fields}


def kernel_key(fields: dict) -> str:
    """sha256 hex of canonical JSON of ``fields`` + schema version, generator hash, LLVM versions."""
    return hashlib.sha256(_canonical(_full_fields(fields)).encode()).hexdigest()


def tuning_key(fields: dict) -> str:
    """Key of a tuning decision; a separate namespace from kernel keys."""
    return kernel_key({"cache_kind": "tuning", **fields})


# ----------------------------------------------------------------------------- file helpers
def _entry_paths(kind: str, key: str) -> tuple[Path, Path]:
    d = cache_dir() / kind / key[:2]
    return d / f"{key}.o", d / f"{key}.json"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _warn_disk_once(exc: BaseException) -> None:
    global _disk_warned
    with _lock:
        if _disk_warned:
            return
        _disk_warned = True
    why = _why(cache_dir(), exc) if isinstance(exc, OSError) else str(exc)
    where = f"$DFPGEN_CACHE_DIR={cache_dir()}" if raw(ENV_DIR) else f"cache directory {cache_dir()}"
    warn(f"{where} is not usable ({why}); "
         "kernels and tuning decisions are kept in memory for this process", CacheWarning)


def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)


def _read_kernel(obj_path: Path, meta_path: Path) -> tuple[bytes | None, str | None]:
    """``(object, None)`` for a valid entry, ``(None, None)`` if absent, ``(None, why)`` if bad."""
    has_meta, has_obj = meta_path.exists(), obj_path.exists()
    if not has_meta and not has_obj:
        return None, None
    if not has_meta:
        return None, f"{meta_path} is missing (partial entry)"
    try:
        meta = json.loads(meta_path.read_text())
        want = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{meta_path} is unreadable ({type(exc).__name__})"
    try:
        obj = obj_path.read_bytes()
    except OSError:
        return None, f"{obj_path} is missing"
    if hashlib.sha256(obj).hexdigest() != want:
        return None, f"{obj_path} does not match its recorded sha256 (truncated or corrupt)"
    return obj, None


# ----------------------------------------------------------------------------- kernels
def _remember(key: str, obj: bytes, source: str) -> tuple[bytes, str]:
    with _lock:
        _mem.setdefault(key, obj)
        _counts[source] += 1
    return obj, source


def _build(build: Callable[[], bytes]) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    obj = bytes(build())
    return obj, time.perf_counter() - t0


def get_or_build(fields: dict, build: Callable[[], bytes]) -> tuple[bytes, str]:
    """Object code for ``fields``: from memory, from disk, or ``build()`` (then stored).

    Returns ``(object_bytes, source)`` with source ``"memory" | "disk" | "built"``.
    Disk problems never fail the call: they become a :class:`dfpgen.CacheWarning`.
    """
    key = kernel_key(fields)
    with _lock:
        obj = _mem.get(key)
        if obj is not None:
            _counts["memory"] += 1
            return obj, "memory"
    if not disk_enabled():
        obj, _ = _build(build)
        return _remember(key, obj, "built")
    obj_path, meta_path = _entry_paths("kernels", key)
    # Fast path without the lock: metadata is written last, so a valid pair is complete.
    try:
        obj, _bad = _read_kernel(obj_path, meta_path)
    except OSError:
        obj = None
    if obj is not None:
        return _remember(key, obj, "disk")
    try:
        lock = _file_lock(meta_path)
        lock.acquire()
    except Exception as exc:  # read-only / full / not a directory / lock timeout
        _warn_disk_once(exc)
        obj, _ = _build(build)
        return _remember(key, obj, "built")
    try:
        obj, bad = _read_kernel(obj_path, meta_path)  # another process may have finished it
        if obj is not None:
            return _remember(key, obj, "disk")
        if bad:
            warn(f"dfpgen cache entry ignored and rebuilt: {bad}", CacheWarning)
            try:  # readers must never pair the stale metadata with the new object
                meta_path.unlink()
            except OSError:
                pass
        obj, seconds = _build(build)
        meta = {"kind": "kernel", "key": key, "symbol": fields.get("symbol"),
                "fields": _full_fields(fields), "size": len(obj),
                "sha256": hashlib.sha256(obj).hexdigest(), "compile_seconds": round(seconds, 6),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            _atomic_write(obj_path, obj)
            _atomic_write(meta_path, (json.dumps(meta, indent=1, default=str) + "\n").encode())
        except OSError as exc:
            _warn_disk_once(exc)
        return _remember(key, obj, "built")
    finally:
        lock.release()


# ----------------------------------------------------------------------------- tuning
def store_tuning(fields: dict, value: dict) -> str:
    """Store a tuning decision ``value`` (JSON-able: chosen config, timings) under ``fields``.

    Returns the key. Disk problems become one :class:`dfpgen.CacheWarning`; the decision is
    still remembered for this process.
    """
    key = tuning_key(fields)
    with _lock:
        _mem_tuning[key] = value
    if not disk_enabled():
        return key
    _, path = _entry_paths("tuning", key)
    entry = {"kind": "tuning", "key": key, "fields": _full_fields(fields), "value": value,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        with _file_lock(path):
            _atomic_write(path, (json.dumps(entry, indent=1, default=str) + "\n").encode())
    except Exception as exc:
        _warn_disk_once(exc)
    return key


def load_tuning(fields: dict) -> dict | None:
    """The decision stored under ``fields`` or ``None``; an unreadable entry warns and is ``None``."""
    key = tuning_key(fields)
    with _lock:
        if key in _mem_tuning:
            return _mem_tuning[key]
    if not disk_enabled():
        return None
    _, path = _entry_paths("tuning", key)
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        value = json.loads(text)["value"]
        if not isinstance(value, dict):
            raise TypeError("value is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        warn(f"dfpgen tuning entry {path} is unreadable ({type(exc).__name__}); ignored", CacheWarning)
        return None
    with _lock:
        _mem_tuning[key] = value
    return value


def forget_tuning(fields: dict) -> None:
    """Remove one decision from memory and disk (``tune --force`` re-decides)."""
    key = tuning_key(fields)
    with _lock:
        _mem_tuning.pop(key, None)
    _, path = _entry_paths("tuning", key)
    try:
        path.unlink()
    except OSError:
        pass


# ----------------------------------------------------------------------------- CLI helpers
def entries() -> Iterator[dict]:
    """Metadata of every kernel and tuning entry on disk, each with ``kind``, ``key``, ``path``.

    A kernel entry also gets ``object_path``; an unreadable entry gets ``error`` (a string).
    """
    root = cache_dir()
    for kind, sub in (("kernel", "kernels"), ("tuning", "tuning")):
        base = root / sub
        if not base.is_dir():
            continue
        for path in sorted(base.glob("*/*.json")):
            try:
                meta = json.loads(path.read_text())
                if not isinstance(meta, dict):
                    raise TypeError("not an object")
            except (OSError, ValueError, TypeError) as exc:
                meta = {"error": f"unreadable metadata ({type(exc).__name__})"}
            meta.update(kind=kind, key=path.stem, path=str(path))
            if kind == "kernel":
                meta["object_path"] = str(path.with_suffix(".o"))
            yield meta
        if kind == "kernel":
            # An object whose metadata never landed is a partial entry; list it so verify sees it.
            for obj in sorted(base.glob("*/*.o")):
                if not obj.with_suffix(".json").exists():
                    yield {"kind": kind, "key": obj.stem, "path": str(obj.with_suffix(".json")),
                           "object_path": str(obj), "error": "metadata missing (partial entry)"}


def size_bytes() -> int:
    """Bytes used by the cache directory's kernel and tuning entries."""
    total = 0
    for sub in ("kernels", "tuning"):
        base = cache_dir() / sub
        if base.is_dir():
            total += sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    return total


def clear() -> int:
    """Delete every kernel and tuning entry (disk and memory); returns how many entries went."""
    n = sum(1 for _ in entries())
    for sub in ("kernels", "tuning"):
        shutil.rmtree(cache_dir() / sub, ignore_errors=True)
    forget_memory()
    return n
