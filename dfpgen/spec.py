"""Convolution descriptors and the layer-string grammar.

``ConvSpec`` names one convolution pass in the field's standard letters (benchdnn style):
N batch, C input channels, H x W input size, K output channels, R x S filter size,
stride u (uh, uw), padding p (ph, pw), dilation d (dh, dw); P x Q is the output size.
Groups are always 1.

Full form: ``n32c256h14w14k256r3s3u1p1`` (optionally ``d2`` and per-axis ``uh2uw1``,
``ph1pw0``, ``dh2dw1``), with an optional pass prefix ``fwd:``, ``bwd_data:`` or
``bwd_weight:``. Unset fields take defaults: n=1, h=w=1 ... see ``parse_full``.
"""
from __future__ import annotations

import numbers
import operator
import re
from dataclasses import dataclass, replace

from .errors import DfpError
from .layer_tables import DEFAULT_BATCH, MODELS, RESNET50, find_layer, model_table

PASSES = ("fwd", "bwd_data", "bwd_weight")
# exact: non-saturating dot products, flush interval proven on the operands; fast: saturating,
# the paper's long chains (dfpgen/plan_exact.py, docs/ARCHITECTURE.md §1)
OVERFLOW_MODES = ("exact", "fast")


def _pair(v, name: str) -> tuple[int, int]:
    """``v`` (an integer, e.g. ``2`` or ``np.int64(2)``, or a pair of them) as ``(h, w)``.
    Floats, strings and other types raise :class:`DfpError` (never truncated)."""
    def bad():
        return DfpError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, (str, bytes)):
        raise bad()
    try:
        i = operator.index(v)
        return i, i
    except TypeError:
        pass
    try:
        items = tuple(v)
        if len(items) != 2 or any(isinstance(x, (str, bytes)) for x in items):
            raise bad()
        a, b = (operator.index(x) for x in items)
    except TypeError:
        raise bad() from None
    return a, b


@dataclass(frozen=True)
class ConvSpec:
    """One convolution pass: shapes NCHW (input), KCRS (weights), NKPQ (output).

    Raises :class:`DfpError` for non-positive sizes, negative padding, or an empty output.
    """
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int = 1
    S: int = 1
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    pass_kind: str = "fwd"

    def __post_init__(self):
        for f in ("N", "C", "H", "W", "K", "R", "S"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise DfpError(f"ConvSpec.{f} must be a positive int, got {v!r}")
            object.__setattr__(self, f, int(v))  # numpy integers (shapes) welcome, stored as int
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))
        object.__setattr__(self, "padding", _pair(self.padding, "padding"))
        object.__setattr__(self, "dilation", _pair(self.dilation, "dilation"))
        if min(self.stride) < 1:
            raise DfpError(f"stride must be >= 1, got {self.stride}")
        if min(self.dilation) < 1:
            raise DfpError(f"dilation must be >= 1, got {self.dilation}")
        if min(self.padding) < 0:
            raise DfpError(f"padding must be >= 0, got {self.padding}")
        if self.pass_kind not in PASSES:
            raise DfpError(f"pass must be one of {PASSES}, got {self.pass_kind!r}")
        if self.P < 1 or self.Q < 1:
            raise DfpError(
                f"{self.geometry()}: output would be {self.P}x{self.Q}; the dilated filter "
                f"({self.R}x{self.S}, dilation {self.dilation}) is larger than the padded input")

    # Output size, as torch.nn.Conv2d computes it.
    @property
    def P(self) -> int:
        return (self.H + 2 * self.padding[0] - self.dilation[0] * (self.R - 1) - 1) // self.stride[0] + 1

    @property
    def Q(self) -> int:
        return (self.W + 2 * self.padding[1] - self.dilation[1] * (self.S - 1) - 1) // self.stride[1] + 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one pass (the same for all three passes)."""
        return self.N * self.K * self.P * self.Q * self.C * self.R * self.S

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.K, self.C, self.R, self.S)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.K, self.P, self.Q)

    # A pass's geometry in the spec's own dimensions (table ``_PASS_GEOMETRY`` below): what
    # the planners, which sit below the pass registry (dfpgen/passes.py), read of a pass.
    @property
    def reduction_size(self) -> int:
        """What the integer dot products sum over: C (forward), K (backward-data), N*P*Q
        pixels (backward-weight)."""
        return _PASS_GEOMETRY[self.pass_kind][0](self)

    @property
    def tile_channels(self) -> int:
        """Channels along the register tile's vectors: K (forward), C (backward-data), K
        (backward-weight)."""
        return _PASS_GEOMETRY[self.pass_kind][1](self)

    @property
    def tile_row(self) -> int:
        """Positions along the register tile's other axis: Q output pixels (forward),
        ceil(W / stride_w) pixels of one output phase (backward-data), C (backward-weight)."""
        return _PASS_GEOMETRY[self.pass_kind][2](self)

    @property
    def result_shape(self) -> tuple[int, int, int, int]:
        """The pass's output: Y (N, K, P, Q), dX (N, C, H, W) or dW (K, C, R, S)."""
        return _PASS_GEOMETRY[self.pass_kind][3](self)

    def with_pass(self, pass_kind: str) -> "ConvSpec":
        return replace(self, pass_kind=pass_kind)

    def geometry(self) -> str:
        """The full one-line form without the pass, e.g. ``n32c256h14w14k256r3s3u1p1``."""
        s = f"n{self.N}c{self.C}h{self.H}w{self.W}k{self.K}r{self.R}s{self.S}"
        for key, (a, b), dflt in (("u", self.stride, None), ("p", self.padding, None), ("d", self.dilation, 1)):
            if a == b:
                if dflt is None or a != dflt:
                    s += f"{key}{a}"
            else:
                s += f"{key}h{a}{key}w{b}"
        return s

    def __str__(self) -> str:
        return f"{self.pass_kind}:{self.geometry()}"


_memo: dict[tuple, ConvSpec] = {}


def spec_of(n, c, h, w, k, r=1, s=1, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
            pass_kind: str = "fwd") -> ConvSpec:
    """``ConvSpec(...)`` memoised on its arguments: validation costs more than the kernels of
    a small layer, and every pass of every call builds one. Same errors as ``ConvSpec``."""
    # repr: True and 1 hash alike (and (1, 1) like [1, 1]), but only some are valid strides
    key = (n, c, h, w, k, r, s, repr(stride), repr(padding), repr(dilation), pass_kind)
    hit = _memo.get(key)
    if hit is None:
        hit = _memo[key] = ConvSpec(n, c, h, w, k, r, s, stride, padding, dilation, pass_kind)
    return hit


_TOKEN = re.compile(r"(uh|uw|ph|pw|dh|dw|[nchwkrsupd])(\d+)")
_FIELDS = {"n": "N", "c": "C", "h": "H", "w": "W", "k": "K", "r": "R", "s": "S"}


def parse_full(text: str, pass_kind: str = "fwd") -> ConvSpec:
    """Parse the full form (``[pass:]n32c256h14w14k256r3s3u1p1``). ``c`` and ``k`` are required;
    n=1, h=w=1, r=s=1, stride 1, padding 0, dilation 1 by default; ``h`` alone sets W too (and
    ``r`` alone sets S), as benchdnn does. Raises :class:`DfpError` naming the bad part."""
    raw = text
    text = text.strip().lower()
    if ":" in text:
        pass_kind, text = text.split(":", 1)
    pos, vals = 0, {}
    for m in _TOKEN.finditer(text):
        if m.start() != pos:
            break
        key = m.group(1)
        if key in vals:
            raise DfpError(f"layer {raw!r}: field {key!r} given twice")
        vals[key] = int(m.group(2))
        pos = m.end()
    if pos != len(text) or not text:
        raise DfpError(f"layer {raw!r}: cannot parse {text[pos:] or text!r}; expected a form such as "
                       "n32c256h14w14k256r3s3u1p1")
    for req in ("c", "k"):
        if req not in vals:
            raise DfpError(f"layer {raw!r}: missing {req!r} ({'input' if req == 'c' else 'output'} channels)")
    kw = {_FIELDS[k]: v for k, v in vals.items() if k in _FIELDS}
    kw.setdefault("N", 1)
    kw.setdefault("H", 1)
    kw.setdefault("W", vals.get("h", 1))
    kw.setdefault("R", 1)
    kw.setdefault("S", vals.get("r", 1))

    def pair(key, dflt):
        one = vals.get(key, dflt)
        return (vals.get(key + "h", one), vals.get(key + "w", one))

    return ConvSpec(**kw, stride=pair("u", 1), padding=pair("p", 0), dilation=pair("d", 1),
                    pass_kind=pass_kind)


# ----------------------------------------------------------------------------- layer strings
_SHORT = re.compile(r"(\d+)x(\d+)x(\d+)")
LAYER_EXAMPLES = "3x3x256, n32c256h14w14k256r3s3u1p1, resnet50:res4_branch2b"


def _short_match(R: int, S: int, C: int):
    """The ResNet-50 layer a short ``RxSxC`` stands for: among rows with that R, S and C,
    prefer K == C and stride 1 (the repeated block layer: 3x3x256 -> res4_branch2b, 14x14),
    then stride 1, then the first row. ``None`` when no row has that R, S, C."""
    rows = []
    for name, _, geo in RESNET50:
        s = parse_full(geo)
        if (s.R, s.S, s.C) == (R, S, C):
            rows.append((name, s))
    for want in (lambda s: s.K == C and s.stride == (1, 1), lambda s: s.stride == (1, 1), lambda s: True):
        for name, s in rows:
            if want(s):
                return name, s
    return None


def parse_layer(text: str, *, batch: int | None = None, hw=None, k: int | None = None,
                stride=None, pad=None, pass_kind: str = "fwd") -> ConvSpec:
    """Parse a layer string into a :class:`ConvSpec` (``dfpgen tune --layer``).

    Forms (an optional ``fwd:``/``bwd_data:``/``bwd_weight:`` prefix overrides ``pass_kind``):

    - short ``RxSxC`` (``3x3x256``): R x S filter, C = K channels, with the spatial size,
      stride and padding of the matching ResNet-50 layer (:func:`_short_match`); batch 32.
      A short form that matches no ResNet-50 layer needs ``hw`` (padding then defaults to
      R // 2, "same", and stride to 1);
    - full ``n32c256h14w14k256r3s3u1p1`` (:func:`parse_full`);
    - named ``resnet50:res4_branch2b`` (batch 32).

    ``batch``, ``hw`` (int or (H, W)), ``k``, ``stride`` and ``pad`` (int or pair) override
    the parsed values when given. Raises :class:`DfpError` naming what was wrong, with a
    valid example.
    """
    if not isinstance(text, str) or not text.strip():
        raise DfpError(f"layer string is empty; examples: {LAYER_EXAMPLES}")
    raw, body = text, text.strip().lower()
    head, sep, rest = body.partition(":")
    if sep and head in PASSES:
        pass_kind, body = head, rest.strip()
    elif pass_kind not in PASSES:
        raise DfpError(f"pass must be one of {', '.join(PASSES)}, got {pass_kind!r}")
    head, sep, rest = body.partition(":")
    if sep:
        if head not in MODELS:
            raise DfpError(f"layer {raw!r}: unknown model {head!r} (known: {', '.join(sorted(MODELS))}, "
                           f"or a pass prefix {', '.join(PASSES)}); example: resnet50:res4_branch2b")
        _, _, geo = find_layer(head, rest.strip())
        spec = parse_full(f"n{DEFAULT_BATCH}{geo}", pass_kind)
    elif (m := _SHORT.fullmatch(body)) is not None:
        R, S, C = (int(g) for g in m.groups())
        if min(R, S, C) < 1:
            raise DfpError(f"layer {raw!r}: R, S and C must be positive; example: 3x3x256")
        match = _short_match(R, S, C)
        if match is None and hw is None:
            raise DfpError(f"layer {raw!r}: no ResNet-50 layer has a {R}x{S} filter over {C} channels, "
                           "so the spatial size is unknown; give it with --hw (e.g. --hw 14)")
        if match is not None:
            ms = match[1]
            spec = ConvSpec(DEFAULT_BATCH, C, ms.H, ms.W, C, R, S, ms.stride, ms.padding, pass_kind=pass_kind)
        else:
            spec = ConvSpec(DEFAULT_BATCH, C, 1, 1, C, R, S, 1, (R // 2, S // 2), pass_kind=pass_kind)
    elif body[:1].isalpha():
        spec = parse_full(body, pass_kind)
    else:
        raise DfpError(f"layer {raw!r} is not a layer string; examples: {LAYER_EXAMPLES}")
    over = {}
    if batch is not None:
        over["N"] = batch
    if hw is not None:
        over["H"], over["W"] = _pair(hw, "hw")
    if k is not None:
        over["K"] = k
    if stride is not None:
        over["stride"] = stride
    if pad is not None:
        over["padding"] = pad
    return replace(spec, **over) if over else spec


def model_specs(model: str, *, batch: int = DEFAULT_BATCH, pass_kind: str = "fwd") -> list:
    """``[(name, count, ConvSpec)]`` for every layer of ``model`` (``dfpgen.layer_tables``) at
    batch ``batch``; :class:`DfpError` for an unknown model."""
    return [(name, count, parse_full(f"n{batch}{geo}", pass_kind))
            for name, count, geo in model_table(model)]


# pass -> (reduction_size, tile_channels, tile_row, result_shape) of a ConvSpec
_PASS_GEOMETRY = {
    "fwd": (lambda s: s.C, lambda s: s.K, lambda s: s.Q, lambda s: s.output_shape),
    "bwd_data": (lambda s: s.K, lambda s: s.C, lambda s: -(-s.W // s.stride[1]), lambda s: s.input_shape),
    "bwd_weight": (lambda s: s.N * s.P * s.Q, lambda s: s.K, lambda s: s.C, lambda s: s.weight_shape),
}
