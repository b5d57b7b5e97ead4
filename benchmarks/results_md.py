"""Shared by the benchmark scripts: replace one named section of benchmarks/RESULTS.md,
leaving the other scripts' sections as they are."""
from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# dfpgen benchmark results\n\nEach section is written by the script it names; rerun it to refresh.\n"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Put ``body`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``."""
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
