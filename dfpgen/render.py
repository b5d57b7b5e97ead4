"""jinja2 over the IR templates in ``templates/`` (package ``dfpgen.templates``).

Templates loop over plan fields and do no arithmetic of their own: every number they print
comes from the plan. ``StrictUndefined`` turns a missing plan field into an error instead of
an empty string in the IR.
"""
from __future__ import annotations

import hashlib
import struct
from functools import lru_cache
from importlib import resources

import jinja2


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("dfpgen.templates", "."),  # works editable and installed
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **fields) -> str:
    """Render ``templates/<template>`` with ``fields``; returns LLVM IR text."""
    return environment().get_template(template).render(**fields)


def template_names() -> list[str]:
    return sorted(p.name for p in resources.files("dfpgen.templates").iterdir() if p.name.endswith(".ll.j2"))


# Modules that never shape generated code. Everything else in dfpgen/ is hashed: a new module
# is assumed to generate code until listed here (a stale kernel is worse than a rebuild).
NOT_GENERATOR = frozenset({
    "__init__.py", "autotune.py", "baseline.py", "cache.py", "cli.py", "cli_commands.py",
    "bn_reference.py", "conv.py", "decisions.py", "env.py", "errors.py", "layer_tables.py", "log.py",
    "measure.py",
    "reference.py", "runinfo.py", "spec.py",
    "threads.py",
})


@lru_cache(maxsize=1)
def generator_hash() -> str:
    """sha256 over the code-generating sources (``dfpgen/*.py`` but ``NOT_GENERATOR``, and
    ``templates/*``).

    Part of every cache key (docs/ARCHITECTURE.md §4): any change to the generator invalidates kernels.
    """
    h = hashlib.sha256()
    pkg = resources.files("dfpgen")
    for p in sorted(pkg.iterdir(), key=lambda p: p.name):
        if p.name.endswith(".py") and p.name not in NOT_GENERATOR:
            h.update(p.name.encode()); h.update(p.read_bytes())
    for p in sorted(resources.files("dfpgen.templates").iterdir(), key=lambda p: p.name):
        if p.name.endswith(".j2"):
            h.update(p.name.encode()); h.update(p.read_bytes())
    return h.hexdigest()


def llvm_float(v: float) -> str:
    """An LLVM IR float literal (the double's hex pattern; exact for float32 values)."""
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", float(v)))[0]
