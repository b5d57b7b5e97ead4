"""Kernel and tuning cache (DESIGN §4).

Interface used by the rest of dfpgen (stable):

- ``kernel_key(fields: dict) -> str``: sha256 hex of canonical JSON of ``fields`` plus the
  schema version, generator hash and LLVM/llvmlite versions.
- ``get_or_build(fields: dict, build: Callable[[], bytes]) -> tuple[bytes, str]``: object code
  for ``fields``, from memory, disk, or ``build()``; the second item says where it came from
  (``"memory" | "disk" | "built"``).

The on-disk part is being written (issue 3, item 6); until then this keeps objects in memory.
"""
from __future__ import annotations

import hashlib
import json
import threading
from typing import Callable

from .jit import llvm_versions
from .render import generator_hash

SCHEMA_VERSION = 1
_mem: dict[str, bytes] = {}
_lock = threading.Lock()


def kernel_key(fields: dict) -> str:
    full = {"schema": SCHEMA_VERSION, "generator": generator_hash(), **llvm_versions(), **fields}
    blob = json.dumps(full, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def get_or_build(fields: dict, build: Callable[[], bytes]) -> tuple[bytes, str]:
    key = kernel_key(fields)
    with _lock:
        if key in _mem:
            return _mem[key], "memory"
    obj = build()
    with _lock:
        _mem[key] = obj
    return obj, "built"
