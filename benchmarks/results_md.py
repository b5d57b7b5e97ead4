"""Shared by the benchmark scripts: replace one named section of benchmarks/RESULTS.md,
leaving the other scripts' sections as they are."""
from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("# dfpgen benchmark results\n\nEach section is written by the script it names, for one machine and "
          "ISA tier (the tag in its markers and first line); rerun the script to refresh it.\n")


def host_tag() -> str:
    """``<LLVM CPU name>-<ISA tier>`` of this process (``znver3-avx2``; a tier forced with
    ``DFPGEN_ISA`` reads ``znver4-forced-avx2``): sections are kept per machine and tier, so a
    run on one machine never replaces another machine's figures."""
    from dfpgen.target import host_target
    t = host_target()
    return f"{t.cpu}-{'forced-' if t.forced else ''}{t.tier}"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Put ``body`` between ``<!-- name@tag:begin -->`` and ``<!-- name@tag:end -->`` in
    ``path``, ``tag`` being :func:`host_tag`, and the tag's machine line on top of it."""
    tag = host_tag()
    text = path.read_text() if path.exists() else HEADER
    body = f"*Machine: {tag} (LLVM CPU name, ISA tier).*\n\n{body}"
    name = f"{name}@{tag}"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
