"""Layer tables of reference networks, embedded in the package (the benchmark's case list is
not shipped). ResNet-50 as in torchvision v1.5 (stride on the 3x3 conv), 224x224 input.

Each row: ``(name, count, geometry)`` where ``count`` is how many times that exact shape
occurs in the network (for end-to-end weighting) and ``geometry`` the full layer form
without the batch (``c256h14w14k256r3s3u1p1``, see :func:`dfpgen.spec.parse_full`; this module
holds data only, so the layer grammar in ``dfpgen.spec`` can import it).
The fully connected layer is a 1x1 convolution over 1x1 pixels.
"""
from __future__ import annotations

import difflib

from .errors import DfpError

RESNET50 = (
    ("conv1", 1, "c3h224w224k64r7s7u2p3"),
    ("res2a_branch1", 1, "c64h56w56k256r1s1u1p0"),
    ("res2a_branch2a", 1, "c64h56w56k64r1s1u1p0"),
    ("res2_branch2b", 3, "c64h56w56k64r3s3u1p1"),
    ("res2_branch2c", 3, "c64h56w56k256r1s1u1p0"),
    ("res2bc_branch2a", 2, "c256h56w56k64r1s1u1p0"),
    ("res3a_branch1", 1, "c256h56w56k512r1s1u2p0"),
    ("res3a_branch2a", 1, "c256h56w56k128r1s1u1p0"),
    ("res3a_branch2b", 1, "c128h56w56k128r3s3u2p1"),
    ("res3_branch2b", 3, "c128h28w28k128r3s3u1p1"),
    ("res3_branch2c", 4, "c128h28w28k512r1s1u1p0"),
    ("res3bcd_branch2a", 3, "c512h28w28k128r1s1u1p0"),
    ("res4a_branch1", 1, "c512h28w28k1024r1s1u2p0"),
    ("res4a_branch2a", 1, "c512h28w28k256r1s1u1p0"),
    ("res4a_branch2b", 1, "c256h28w28k256r3s3u2p1"),
    ("res4_branch2b", 5, "c256h14w14k256r3s3u1p1"),
    ("res4_branch2c", 6, "c256h14w14k1024r1s1u1p0"),
    ("res4bf_branch2a", 5, "c1024h14w14k256r1s1u1p0"),
    ("res5a_branch1", 1, "c1024h14w14k2048r1s1u2p0"),
    ("res5a_branch2a", 1, "c1024h14w14k512r1s1u1p0"),
    ("res5a_branch2b", 1, "c512h14w14k512r3s3u2p1"),
    ("res5_branch2b", 2, "c512h7w7k512r3s3u1p1"),
    ("res5_branch2c", 3, "c512h7w7k2048r1s1u1p0"),
    ("res5bc_branch2a", 2, "c2048h7w7k512r1s1u1p0"),
    ("fc1000", 1, "c2048h1w1k1000r1s1u1p0"),
)

MODELS = {"resnet50": RESNET50}
DEFAULT_BATCH = 32


def model_table(model: str) -> tuple[tuple[str, int, str], ...]:
    """The ``(name, count, geometry)`` rows of ``model``; :class:`DfpError` for an unknown model."""
    try:
        return MODELS[model.strip().lower()]
    except KeyError:
        raise DfpError(f"unknown model {model!r}; known: {', '.join(sorted(MODELS))}") from None


def find_layer(model: str, name: str) -> tuple[str, int, str]:
    """The row called ``name`` in ``model``. A typo raises :class:`DfpError` listing close names."""
    rows = model_table(model)
    for row in rows:
        if row[0] == name:
            return row
    names = [r[0] for r in rows]
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known layers: {', '.join(names)}"
    raise DfpError(f"no layer {name!r} in {model}; {hint}")
