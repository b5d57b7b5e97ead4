"""DFP16 numerics: INT16 mantissas sharing one integer exponent per tensor (numpy only).

Source: Das et al., *Mixed Precision Training of Convolutional Neural Networks using Integer
Operations* (ICLR 2018), §3 (dynamic fixed point). A DFP tensor holds INT16 mantissas ``I``
and one exponent ``E``; the value of an element is ``I * 2**E``.

Shared exponent rule (implemented here; the usual statement ``E = e - (P-1)`` would put
the largest element in ``[2**(P-2), 2**(P-1))`` and waste a bit, so the rule below is the one
matching the stated range):

    m = max|x| = f * 2**e with 0.5 <= f < 1 (math.frexp)
    E = e - P            -> the largest |x| * 2**-E = f * 2**P lies in [2**(P-1), 2**P)

``P`` is the number of magnitude bits (15 for DFP16: the max lands in ``[2**14, 2**15)``).
Rounding may lift the largest element to ``2**P``; every mantissa is clamped to
``+/-(2**P - 1)`` (so never -32768, which would let a single pair product
``(-32768)*(-32768)*2`` overflow an INT32 lane).

Exponent range: the format promises an int8 exponent, ``-128 <= E <= 127``.

- ``e - P > 127`` (only float64 input can be that large) raises :class:`DfpError`.
- ``e - P < -128`` (max |x| < 2**-114, about 4.8e-35, for P = 15: tiny float32 values and
  subnormals, or tiny float64) uses ``E = -128`` and warns :class:`dfpgen.UnderflowWarning`
  naming the tensor: the mantissas keep the values' multiples of ``2**-128`` (fewer than P
  bits) and everything below half of that resolution rounds to zero (float32 values below
  2**-129, about 1.5e-39, quantize to zero). The range is not widened: the kernels scale
  their INT32 partials by ``2**(Ea+Eb)``, which must stay a float32, and the format promises
  an int8 exponent.
- An all-zero tensor gets mantissas 0 and ``E = 0``; an empty tensor an empty mantissa
  array and ``E = 0``.

Scaling ``v = x * 2**-E`` is done in float32 arithmetic for float16/float32 input (float16
converts to float32 exactly) and in float64 for float64 and integer input. The factor is
applied as ``(x * s1) * s2`` with float scalars ``s1 = 2**-E, s2 = 1`` except for
``E = -128`` where ``2**128`` is not a float32, and ``s1 = s2 = 2**64``. Scaling up by a power of
two is exact; scaling down is IEEE round-to-nearest-even when the result is subnormal (it
then rounds to a mantissa of 0 or, for stochastic rounding, almost always 0). The generated
pack kernel does the same two multiplications, so it gives the same bits.

Rounding (``DfpFormat.rounding``):

- ``"nearest"``: round to nearest, ties to even (``np.rint``; ``llvm.roundeven``).
- ``"stochastic"``: counter-based, keyed on (seed, flat C-order element index) only, so the
  bits do not depend on chunking or thread count. Exact definition (uint32 wrapping)::

      fmix32(h): h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
      i  = flat C-order index of the element in the logical shape of x (uint64)
      h  = fmix32(uint32(i) ^ fmix32(uint32(seed)))     # seed taken modulo 2**32
      h  = fmix32(h + uint32(i >> 32))
      k  = h >> 8                                          # 24 random bits
      fl = floor(v); frac = v - fl                         # exact in float32
      I  = fl + (1 if float(k) < frac * 2**24 else 0)      # compared in v's float type, exact

  ``P(round up) = ceil(frac * 2**24) / 2**24``: unbiased up to 2**-24 of a mantissa step.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DfpError, UnderflowWarning

# the range of one INT32 lane of a dot-product accumulator
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1

ROUNDINGS = ("nearest", "stochastic")
EXP_MIN, EXP_MAX = -128, 127  # int8, as the format promises

_M1 = np.uint32(0x85EBCA6B)
_M2 = np.uint32(0xC2B2AE35)


@dataclass(frozen=True)
class DfpFormat:
    """A DFP format: ``bits`` magnitude bits P (2..15; 15 = DFP16) and the rounding mode.

    Fewer bits than 15 leave headroom in the INT16 container (the max mantissa is
    ``2**bits - 1``). Raises :class:`DfpError` for bits outside 2..15 or an unknown rounding.
    """
    bits: int = 15
    rounding: str = "nearest"

    def __post_init__(self):
        if not isinstance(self.bits, (int, np.integer)) or isinstance(self.bits, bool) \
                or not 2 <= self.bits <= 15:
            raise DfpError(f"DfpFormat.bits (magnitude bits P) must be an int in 2..15, got {self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))
        if self.rounding not in ROUNDINGS:
            raise DfpError(f"DfpFormat.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def max_mantissa(self) -> int:
        """Largest mantissa magnitude ``2**bits - 1`` (32767 for DFP16); the clamp is symmetric."""
        return (1 << self.bits) - 1

    def key(self) -> dict:
        """Fields that change generated code (for kernel cache keys)."""
        return {"bits": self.bits, "rounding": self.rounding}


DFP16 = DfpFormat()


@dataclass(frozen=True)
class DfpTensor:
    """A quantized tensor: ``mantissa`` (np.int16, any strides) and one shared ``exponent``.

    Element value = ``mantissa * 2**exponent``. Raises :class:`DfpError` if the mantissa is not
    int16 or the exponent is outside [-128, 127].
    """
    mantissa: np.ndarray
    exponent: int
    fmt: DfpFormat = DFP16

    def __post_init__(self):
        if not isinstance(self.mantissa, np.ndarray) or self.mantissa.dtype != np.int16:
            raise DfpError(f"DfpTensor.mantissa must be an np.int16 array, got "
                           f"{getattr(self.mantissa, 'dtype', type(self.mantissa))}")
        e = self.exponent
        if isinstance(e, (float, np.floating)) and float(e).is_integer():
            e = int(e)
        try:
            e = operator.index(e)  # a fractional or string exponent is a mistake, not a value to truncate
        except TypeError:
            raise DfpError(f"DfpTensor.exponent must be an integer, got {self.exponent!r}") from None
        if not EXP_MIN <= e <= EXP_MAX:
            raise DfpError(f"DfpTensor.exponent {e} outside the int8 range [{EXP_MIN}, {EXP_MAX}]")
        object.__setattr__(self, "exponent", e)
        if not isinstance(self.fmt, DfpFormat):
            raise DfpError(f"DfpTensor.fmt must be a DfpFormat, got {type(self.fmt).__name__}")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.mantissa.shape

    @property
    def size(self) -> int:
        return self.mantissa.size

    @property
    def max_abs_mantissa(self) -> int:
        """max |mantissa| (0 for an empty tensor), as a Python int."""
        if self.mantissa.size == 0:
            return 0
        return int(np.max(np.abs(self.mantissa.astype(np.int32))))

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """``mantissa * 2**exponent`` as ``dtype``; see :func:`dequantize`."""
        return dequantize(self, dtype)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on a uint32 array (wrapping arithmetic)."""
    h = np.asarray(h, dtype=np.uint32).copy()
    h ^= h >> np.uint32(16)
    h *= _M1
    h ^= h >> np.uint32(13)
    h *= _M2
    h ^= h >> np.uint32(16)
    return h


def seed_mix(seed: int) -> int:
    """``fmix32(seed mod 2**32)`` as a Python int: the seed's hash every stochastic-rounding
    kernel takes, without numpy's per-call cost (tens of microseconds for one element)."""
    h = int(seed) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def check_seed(seed: Any) -> int:
    """``seed`` as an int; a float or string seed raises :class:`DfpError` (never truncated)."""
    if isinstance(seed, (str, bytes)):
        raise DfpError(f"seed must be an integer, got {seed!r}")
    try:
        return operator.index(seed)
    except TypeError:
        raise DfpError(f"seed must be an integer, got {seed!r}") from None


def random_bits24(index: np.ndarray, seed: int) -> np.ndarray:
    """The 24 random bits ``k`` (uint32 < 2**24) of stochastic rounding for flat element
    indices ``index`` (uint64 array) and ``seed``; see the module docstring."""
    i = np.asarray(index, dtype=np.uint64)
    s = fmix32(np.array([int(seed) & 0xFFFFFFFF], dtype=np.uint32))[0]
    h = fmix32((i & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ s)
    h = fmix32(h + (i >> np.uint64(32)).astype(np.uint32))
    return h >> np.uint32(8)


def exponent_for(max_abs: float, fmt: DfpFormat = DFP16, name: str = "tensor") -> int:
    """The shared exponent ``E = e - P`` for a tensor whose largest magnitude is ``max_abs``
    (``max_abs = f * 2**e``, ``0.5 <= f < 1``), clamped below at -128 with an
    :class:`dfpgen.UnderflowWarning` naming ``name``; 0 when ``max_abs == 0``.

    Raises :class:`DfpError` if ``max_abs`` is negative or not finite, or ``E > 127``.
    """
    max_abs = float(max_abs)
    if not math.isfinite(max_abs) or max_abs < 0:
        raise DfpError(f"{name}: max_abs must be finite and >= 0, got {max_abs!r}")
    if max_abs == 0.0:
        return 0
    _, e = math.frexp(max_abs)
    E = e - fmt.bits
    if E > EXP_MAX:
        raise DfpError(f"{name}: max |x| = {max_abs:.6g} needs shared exponent {E} > {EXP_MAX}: outside the "
                       f"int8 exponent range of the DFP format (P={fmt.bits})")
    if E < EXP_MIN:
        # One message per tensor name (no value in it), so the default warning filter shows
        # it once per name rather than at every step of a run with tiny gradients.
        warnings.warn(f"{name}: max |x| < 2**{EXP_MIN + fmt.bits - 1} is below the DFP format's range: "
                      f"the shared exponent is clamped at {EXP_MIN} (int8), so its mantissas keep "
                      f"fewer than {fmt.bits} bits and values below 2**{EXP_MIN - 1} quantize to zero",
                      UnderflowWarning, stacklevel=3)
        return EXP_MIN
    return E


def scale_factors(exponent: int) -> tuple[float, float]:
    """``(s1, s2)`` with ``s1 * s2 = 2**-exponent`` and both representable in float32:
    ``v = (x * s1) * s2`` (see the module docstring)."""
    if exponent == EXP_MIN:
        return 2.0 ** 64, 2.0 ** 64
    return 2.0 ** -exponent, 1.0


def _float_view(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind == "f" and not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.float16:
        return a.astype(np.float32)
    if a.dtype in (np.float32, np.float64):
        return a
    if a.dtype.kind in "iu":
        return a.astype(np.float64)
    raise DfpError(f"{name}: cannot quantize dtype {a.dtype}; expected float16/32/64 or integers")


def check_finite(a: np.ndarray, name: str = "tensor") -> None:
    """Raise :class:`DfpError` naming ``name`` if ``a`` holds NaN or Inf: what was found,
    how many, and the first (C-order) index as a tuple."""
    bad = ~np.isfinite(a)
    if not bad.any():
        return
    raise_nonfinite(a, bad, name)


def raise_nonfinite(a: np.ndarray, bad: np.ndarray | None = None, name: str = "tensor") -> None:
    """Build and raise the NaN/Inf :class:`DfpError` for ``a`` (the error path only)."""
    a = np.asarray(a)
    if bad is None:
        bad = ~np.isfinite(a)
    n_nan = int(np.isnan(a).sum())
    n_inf = int(bad.sum()) - n_nan
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad.ravel(order="C"))), a.shape))
    what = " and ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if s)
    raise DfpError(f"{name}: cannot quantize to DFP: found {what} value(s) among {a.size} "
                   f"(first at index {first} = {float(a[first])})")


def _round_scaled(v: np.ndarray, fmt: DfpFormat, seed: int, index_offset: int) -> np.ndarray:
    """Round the scaled values ``v`` (float32/64, C-order flat indices start at
    ``index_offset``) and clamp to the format; returns int16 of v's shape."""
    if fmt.rounding == "nearest":
        r = np.rint(v)
    else:
        fl = np.floor(v)
        frac = v - fl
        idx = np.arange(index_offset, index_offset + v.size, dtype=np.uint64).reshape(v.shape)
        k = random_bits24(idx, seed).astype(v.dtype)
        r = fl + (k < frac * v.dtype.type(2.0 ** 24))
    m = fmt.max_mantissa
    return np.clip(r, -m, m).astype(np.int16)


def _quantize_with_exponent(a: np.ndarray, exponent: int, fmt: DfpFormat, seed: int = 0,
                            index_offset: int = 0) -> np.ndarray:
    """Mantissas of finite float array ``a`` for a given shared exponent; element ``j`` (C order)
    of ``a`` has flat index ``index_offset + j`` for stochastic rounding. Chunks of a tensor
    quantized with their offsets give the same bits as the whole tensor."""
    s1, s2 = scale_factors(exponent)
    t = a.dtype.type
    with np.errstate(over="ignore"):  # forced exponents may overflow to inf: clamped below
        v = (a * t(s1)) * t(s2)
    return _round_scaled(v, fmt, seed, index_offset)


def quantize(x: Any, fmt: DfpFormat = DFP16, *, seed: int = 0, name: str = "tensor",
             exponent: int | None = None) -> DfpTensor:
    """Quantize ``x`` (array-like of float16/32/64 or ints, any shape and strides) to DFP.

    Returns a :class:`DfpTensor` whose ``mantissa`` is np.int16 of ``x``'s shape (C-contiguous)
    and whose ``exponent`` follows :func:`exponent_for` unless ``exponent`` forces it (values
    that do not fit clamp to ``+/-fmt.max_mantissa``). ``seed`` keys stochastic rounding.
    Raises :class:`DfpError` on NaN/Inf (message names ``name``, the count and the first
    index), on a forced exponent outside [-128, 127], or when the tensor is too large for
    the exponent range.
    """
    if not isinstance(fmt, DfpFormat):
        raise DfpError(f"fmt must be a DfpFormat, got {type(fmt).__name__}")
    check_seed(seed)
    a = _float_view(x, name)
    check_finite(a, name)
    if exponent is None:
        exponent = exponent_for(float(np.max(np.abs(a))) if a.size else 0.0, fmt, name)
    else:
        forced = exponent
        try:  # 1.5 must not become 1
            if isinstance(forced, bool):
                raise TypeError
            exponent = operator.index(forced)
        except TypeError:
            raise DfpError(f"{name}: forced exponent must be an integer, got {forced!r}") from None
        if not EXP_MIN <= exponent <= EXP_MAX:
            raise DfpError(f"{name}: forced exponent {exponent} outside [{EXP_MIN}, {EXP_MAX}]")
    if a.size == 0:
        return DfpTensor(np.zeros(a.shape, np.int16), exponent, fmt)
    return DfpTensor(np.ascontiguousarray(_quantize_with_exponent(a, exponent, fmt, seed)), exponent, fmt)


def dequantize(q: DfpTensor, dtype=np.float32) -> np.ndarray:
    """``q.mantissa * 2**q.exponent`` as ``dtype`` (float32 by default; exact unless the
    result is a float32 subnormal). Raises :class:`DfpError` if a value does not fit
    ``dtype`` (only possible for exponents > 112: use ``dtype=np.float64``)."""
    if not isinstance(q, DfpTensor):
        raise DfpError(f"dequantize expects a DfpTensor, got {type(q).__name__}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise DfpError(f"dequantize: dtype must be float32 or float64, got {dtype}")
    with np.errstate(over="ignore"):
        out = np.ldexp(q.mantissa.astype(dtype), np.int32(q.exponent)).astype(dtype, copy=False)
    if q.exponent > 100 and not np.isfinite(out).all():
        raise DfpError(f"dequantize: values up to {q.max_abs_mantissa}*2**{q.exponent} overflow "
                       f"{dtype}; pass dtype=np.float64")
    return out
