"""The golden model: exact integer (int64) convolution and GEMM in numpy, and the FP32 result
the generated kernels must reproduce bit for bit for a given flush schedule (groups = 1).

Shapes: X NCHW, W KCRS, Y / dY NKPQ, mantissas as integer arrays; stride ``u``, padding
``pad`` and dilation ``d`` are ints or (h, w) pairs. Output size as torch:
``P = (H + 2*pad_h - d_h*(R-1) - 1) // u_h + 1`` (Q likewise).

Exact results (int64, no flushing):

- forward          ``Y[n,k,p,q]  = sum_{c,r,s} X[n,c,p*u_h + r*d_h - pad_h, q*u_w + s*d_w - pad_w] * W[k,c,r,s]``
- backward-data    ``dX[n,c,h,w] = sum_{k,r,s,p,q: h = p*u_h + r*d_h - pad_h, w = q*u_w + s*d_w - pad_w} dY[n,k,p,q] * W[k,c,r,s]``
- backward-weight  ``dW[k,c,r,s] = sum_{n,p,q} dY[n,k,p,q] * X[n,c,p*u_h + r*d_h - pad_h, q*u_w + s*d_w - pad_w]``

(X outside the image, i.e. in the padding, is 0.)

Flush model (what the kernels compute; docs/ARCHITECTURE.md §1 "flush interval", §3 "Flush"). Every output
element owns one INT32 lane; its reduction runs in the order below, split into *chunks*; each
chunk's INT32 *partial* is flushed into an FP32 accumulator, then the lane restarts at 0:

- forward, output (n,k,p,q), reduction over (c, r, s)::

      for c0 in range(0, C, c_block):          # c_block even
          for t, (r, s) in enumerate((r, s) for r in range(R) for s in range(S)):
              for c in range(c0, min(c0 + c_block, C)):   # pairs (c, c+1); odd C: last pair (C-1, 0)
                  lane += X[n,c,h(p,r),w(q,s)] * W[k,c,r,s]
              if (t + 1) % flush_taps == 0 or t == R*S - 1: flush(lane)

  so a partial holds at most ``c_block * flush_taps`` products (``flush_taps=None``: R*S).
  Taps that fall into the padding contribute 0 but keep their place in the tap count ``t``.
- backward-data, output (n,c,h,w), reduction over (k, r, s): the same loop with K for C and
  ``k_block`` for ``c_block``, taps (r, s) in the order of the *original, unflipped* filter
  index, and tap (r, s) contributing ``dY[n,k,p,q] * W[k,c,r,s]`` with
  ``p = (h + pad_h - r*d_h) / u_h`` and ``q = (w + pad_w - s*d_w) / u_w`` when both are integers
  inside [0, P) x [0, Q), else 0. Chunk boundaries sit at fixed tap indices ``t`` whatever
  the stride, so a stride-decomposed kernel that skips the taps of other phases flushes after
  the same ``t``; a chunk with no valid tap has partial 0 and adding +0 changes nothing.
- backward-weight, output (k,c,r,s), reduction over pixels ``m = (n*P + p)*Q + q`` in
  increasing order, pairs (m, m+1) with m even (N*P*Q padded to even with 0), one chunk per
  ``flush_pixels`` consecutive m; pixels whose input tap is in the padding contribute 0
  and still count. ``flush_pixels`` should be even; an odd one splits a pair between two
  chunks, and each half then is a pair step of its own (the other product 0).
- GEMM ``C[m,n] = sum_k A[m,k] B[k,n]``: chunks of ``k_block`` consecutive k, pairs as above.

FP32 accumulation, per output element, with ``E = Ea + Eb``::

    acc = float32(0)
    for partial in chunks (in order):
        acc = float32(acc + float32(float32(partial) * 2.0**E))
    forward only: y = float32(acc + bias[k])     # bias FP32, after the last partial

``float32(partial)`` rounds the INT32 value to nearest even (``vcvtdq2ps``); multiplying by a
power of two is exact while the product is a normal float32, so an FMA gives the same bits.

INT32 lanes: VNNI adds a *pair* of products per step (``vpdpwssd``: lane += a0*b0 + a1*b1;
pairs are consecutive channels c, c+1 within a block, or pixels m, m+1 for backward-weight).
``overflowed`` says whether any running partial, checked after each pair step, left
``[-2**31, 2**31 - 1]``; in that case the wrapping kernel's partial is the exact one modulo
2**32, which is what ``fp32`` then uses. With ``saturate=True`` (fast mode, ``vpdpwssds``) the
lane clips to the INT32 range after each pair step and ``saturated`` counts the flushed
partials equal to ``+/-limit`` (what a kernel can see at the flush; a lane that clipped and
came back into range is invisible to it) and ``clipped`` the partials that reached a limit at
any pair step, pulled back or not (what the kernels' sticky check bounds from above).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dfp import INT32_MAX, INT32_MIN, DfpTensor
from .errors import DfpError
from .spec import ConvSpec, _pair



@dataclass(frozen=True)
class RefResult:
    """Reference result of one pass: ``exact`` (int64, the unflushed integer sum, no bias),
    ``scale_exp`` (Ea + Eb: value = exact * 2**scale_exp), ``fp32`` (float32, the flushed
    kernel result, bias included), ``overflowed`` (a running INT32 partial left the range),
    ``saturated`` (flushed partials at +/-2**31 limits; 0 unless saturate=True),
    ``partials`` (chunks flushed per output element) and ``clipped`` (partials at a limit
    after any pair step; 0 unless saturate=True)."""
    exact: np.ndarray
    scale_exp: int
    fp32: np.ndarray
    overflowed: bool
    saturated: int
    partials: int
    clipped: int = 0


# ----------------------------------------------------------------------------- geometry
def _ints(a, what: str, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise DfpError(f"{what}: expected integer mantissas, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise DfpError(f"{what}: expected {ndim} dimensions, got shape {a.shape}")
    return a.astype(np.int64)


def _spec(N, C, H, W, K, R, S, stride, padding, dilation, pass_kind) -> ConvSpec:
    return ConvSpec(int(N), int(C), int(H), int(W), int(K), int(R), int(S), _pair(stride, "stride"),
                    _pair(padding, "padding"), _pair(dilation, "dilation"), pass_kind)


def _tap_slices(sp: ConvSpec, r: int, s: int) -> tuple[slice, slice]:
    """Rows/cols of the padded input that tap (r, s) reads for all output pixels."""
    (uh, uw), (dh, dw) = sp.stride, sp.dilation
    return (slice(r * dh, r * dh + (sp.P - 1) * uh + 1, uh), slice(s * dw, s * dw + (sp.Q - 1) * uw + 1, uw))


def _im2col(x: np.ndarray, sp: ConvSpec) -> np.ndarray:
    """(N*P*Q, C*R*S) int64: row m = (n*P + p)*Q + q, column (c*R + r)*S + s, padding = 0."""
    ph, pw = sp.padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.empty((sp.N, sp.P, sp.Q, sp.C, sp.R, sp.S), np.int64)
    for r in range(sp.R):
        for s in range(sp.S):
            hs, ws = _tap_slices(sp, r, s)
            cols[..., r, s] = xp[:, :, hs, ws].transpose(0, 2, 3, 1)
    return cols.reshape(sp.N * sp.P * sp.Q, sp.C * sp.R * sp.S)


def _gather_dy(dy: np.ndarray, sp: ConvSpec) -> np.ndarray:
    """(N*H*W, K*R*S) int64: row (n*H + h)*W + w, column (k*R + r)*S + s holds the dY element
    that tap (r, s) brings to input pixel (h, w), or 0 (backward-data as a gather)."""
    (uh, uw), (ph, pw), (dh, dw) = sp.stride, sp.padding, sp.dilation
    g = np.zeros((sp.N, sp.H, sp.W, sp.K, sp.R, sp.S), np.int64)
    dyt = dy.transpose(0, 2, 3, 1)  # N P Q K
    h, w = np.arange(sp.H), np.arange(sp.W)
    for r in range(sp.R):
        pn = h + ph - r * dh
        vh = (pn % uh == 0) & (pn >= 0) & (pn // uh < sp.P)
        for s in range(sp.S):
            qn = w + pw - s * dw
            vw = (qn % uw == 0) & (qn >= 0) & (qn // uw < sp.Q)
            if vh.any() and vw.any():
                hi, wi = np.nonzero(vh)[0], np.nonzero(vw)[0]
                g[..., r, s][:, hi[:, None], wi[None, :], :] = dyt[:, (pn[hi] // uh)[:, None], (qn[wi] // uw)[None, :], :]
    return g.reshape(sp.N * sp.H * sp.W, sp.K * sp.R * sp.S)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int64 ``a @ b``; through float64 BLAS when every partial sum stays below 2**53
    (numpy's integer matmul has no BLAS and dominates test time on larger shapes)."""
    if a.size == 0 or b.size == 0:
        return a @ b
    bound = a.shape[1] * int(np.abs(a).max()) * int(np.abs(b).max())
    if bound < 2 ** 53:
        return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    return a @ b


# ----------------------------------------------------------------------------- exact results
def conv2d_fwd_int(xm, wm, stride=1, padding=0, dilation=1) -> np.ndarray:
    """Exact forward: X NCHW, W KCRS integer mantissas -> int64 NKPQ. DfpError on bad shapes."""
    x, w = _ints(xm, "forward X (NCHW)", 4), _ints(wm, "forward W (KCRS)", 4)
    if x.shape[1] != w.shape[1]:
        raise DfpError(f"forward: X has C={x.shape[1]} channels but W (KCRS {w.shape}) has C={w.shape[1]}")
    sp = _spec(*x.shape, w.shape[0], *w.shape[2:], stride, padding, dilation, "fwd")
    y = _matmul(_im2col(x, sp), w.reshape(sp.K, -1).T)
    return y.reshape(sp.N, sp.P, sp.Q, sp.K).transpose(0, 3, 1, 2).copy()


def _bwd_data_spec(dy, w, input_hw, stride, padding, dilation) -> ConvSpec:
    H, W = _pair(input_hw, "input_hw")
    sp = _spec(dy.shape[0], w.shape[1], H, W, w.shape[0], *w.shape[2:], stride, padding, dilation, "bwd_data")
    if dy.shape[1:] != (sp.K, sp.P, sp.Q):
        raise DfpError(f"backward-data: dY shape {dy.shape} does not match NKPQ "
                       f"{(sp.N, sp.K, sp.P, sp.Q)} of W {w.shape} on a {H}x{W} input")
    return sp


def conv2d_bwd_data_int(dym, wm, input_hw, stride=1, padding=0, dilation=1) -> np.ndarray:
    """Exact backward-data: dY NKPQ, W KCRS -> int64 dX NCHW of spatial size ``input_hw``
    (the transpose of the forward; input rows no tap reaches get 0)."""
    dy, w = _ints(dym, "backward-data dY (NKPQ)", 4), _ints(wm, "backward-data W (KCRS)", 4)
    sp = _bwd_data_spec(dy, w, input_hw, stride, padding, dilation)
    (ph, pw) = sp.padding
    dxp = np.zeros((sp.N, sp.C, sp.H + 2 * ph, sp.W + 2 * pw), np.int64)
    for r in range(sp.R):
        for s in range(sp.S):
            hs, ws = _tap_slices(sp, r, s)
            part = _matmul(dy.transpose(0, 2, 3, 1).reshape(-1, sp.K), w[:, :, r, s])
            dxp[:, :, hs, ws] += part.reshape(sp.N, sp.P, sp.Q, sp.C).transpose(0, 3, 1, 2)
    return dxp[:, :, ph:ph + sp.H, pw:pw + sp.W].copy()


def _bwd_weight_spec(x, dy, kernel_rs, stride, padding, dilation) -> ConvSpec:
    R, S = _pair(kernel_rs, "kernel_rs")
    if dy.shape[0] != x.shape[0]:
        raise DfpError(f"backward-weight: X batch {x.shape[0]} != dY batch {dy.shape[0]}")
    sp = _spec(*x.shape, dy.shape[1], R, S, stride, padding, dilation, "bwd_weight")
    if dy.shape[2:] != (sp.P, sp.Q):
        raise DfpError(f"backward-weight: dY spatial size {dy.shape[2:]} != output size {(sp.P, sp.Q)} "
                       f"of X {x.shape} with a {R}x{S} filter")
    return sp


def conv2d_bwd_weight_int(xm, dym, kernel_rs, stride=1, padding=0, dilation=1) -> np.ndarray:
    """Exact backward-weight: X NCHW, dY NKPQ -> int64 dW KCRS (``kernel_rs`` = (R, S))."""
    x, dy = _ints(xm, "backward-weight X (NCHW)", 4), _ints(dym, "backward-weight dY (NKPQ)", 4)
    sp = _bwd_weight_spec(x, dy, kernel_rs, stride, padding, dilation)
    dw = _matmul(dy.transpose(1, 0, 2, 3).reshape(sp.K, -1), _im2col(x, sp))
    return dw.reshape(sp.K, sp.C, sp.R, sp.S)


def gemm_int(a, b) -> np.ndarray:
    """Exact ``a @ b``: a (M, K), b (K, N) integer -> int64 (M, N)."""
    a, b = _ints(a, "gemm A (MxK)", 2), _ints(b, "gemm B (KxN)", 2)
    if a.shape[1] != b.shape[0]:
        raise DfpError(f"gemm: A {a.shape} and B {b.shape} do not agree on K")
    return _matmul(a, b)


# ----------------------------------------------------------------------------- flush model
def _check_block(v, what: str) -> int:
    if not isinstance(v, (int, np.integer)) or v < 2 or v % 2:
        raise DfpError(f"{what} must be an even int >= 2 (VNNI consumes INT16 pairs), got {v!r}")
    return int(v)


def _channel_tap_chunks(Cr: int, R: int, S: int, block: int, flush_taps) -> list[np.ndarray]:
    """Chunks of flat reduction indices (c*R + r)*S + s in the forward/backward-data order;
    -1 pads an odd channel count to whole pairs."""
    block = _check_block(block, "c_block/k_block")
    taps = R * S
    ft = taps if flush_taps is None else int(flush_taps)
    if ft < 1:
        raise DfpError(f"flush_taps must be >= 1 or None, got {flush_taps!r}")
    chunks = []
    for c0 in range(0, Cr, block):
        chans = list(range(c0, min(c0 + block, Cr)))
        if len(chans) % 2:
            chans.append(-1)
        for t0 in range(0, taps, ft):
            idx = [(c * R * S + t) if c >= 0 else -1 for t in range(t0, min(t0 + ft, taps)) for c in chans]
            chunks.append(np.array(idx, np.int64))
    return chunks


def _run_chunks(a: np.ndarray, b: np.ndarray, chunks, scale_exp: int, saturate: bool):
    """Flushed FP32 of ``a @ b`` (a (M, L), b (L, J) int64) over ``chunks`` of reduction indices
    (pair order; -1 = zero). Vectorised over outputs; loops over pair steps only in chunks
    whose sum-of-|products| bound can leave the INT32 range."""
    L = a.shape[1]
    az = np.concatenate([a, np.zeros((a.shape[0], 1), np.int64)], axis=1)
    bz = np.concatenate([b, np.zeros((1, b.shape[1]), np.int64)], axis=0)
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    scale = 2.0 ** scale_exp
    overflowed, saturated, clipped = False, 0, 0
    for idx in chunks:
        idx = np.where(idx < 0, L, idx)
        ac, bc = az[:, idx], bz[idx, :]
        if _matmul(np.abs(ac), np.abs(bc)).max(initial=0) <= INT32_MAX:
            part = _matmul(ac, bc)  # no prefix can leave the INT32 range
        else:
            part = np.zeros_like(acc, dtype=np.int64)
            hit = np.zeros(part.shape, bool)
            for j in range(0, len(idx), 2):
                part += np.outer(ac[:, j], bc[j]) + np.outer(ac[:, j + 1], bc[j + 1])
                if saturate:
                    np.clip(part, INT32_MIN, INT32_MAX, out=part)
                    hit |= (part == INT32_MIN) | (part == INT32_MAX)
                elif not overflowed:
                    overflowed = bool(((part < INT32_MIN) | (part > INT32_MAX)).any())
            if saturate:
                saturated += int(((part == INT32_MIN) | (part == INT32_MAX)).sum())
                clipped += int(hit.sum())
            else:
                part = (part - INT32_MIN) % (2 ** 32) + INT32_MIN  # what a wrapping lane holds
        p32 = part.astype(np.float64).astype(np.float32)  # int32 -> float64 exact; one RNE rounding
        acc = acc + (p32.astype(np.float64) * scale).astype(np.float32)
    return acc, overflowed, saturated, clipped


def fp32_error_bound(abs_sum, scale_exp: int, partials: int, fp32=None) -> np.ndarray:
    """Bound on ``|fp32 - exact * 2**scale_exp|`` (float64, per output) for a run without
    INT32 overflow: ``abs_sum`` is the int64 sum of |products| per output (e.g.
    ``conv2d_fwd_int(abs(X), abs(W))``), ``partials`` the chunks flushed per output.

    Each partial is rounded once to FP32 (relative error <= u = 2**-24) and added once in FP32;
    recursive summation of ``partials`` rounded terms is off by at most
    ``gamma(partials + 1) * sum|partial| <= gamma(partials + 1) * abs_sum * 2**scale_exp`` with
    ``gamma(n) = n*u / (1 - n*u)`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
    §4.2). Passing ``fp32`` (bias already added) adds the bias addition's ``u * |fp32|``.
    """
    u = 2.0 ** -24
    n = partials + 1
    bound = np.asarray(abs_sum, np.float64) * 2.0 ** scale_exp * (n * u / (1 - n * u))
    if fp32 is not None:
        bound = bound + u * np.abs(np.asarray(fp32, np.float64)) * (1 + u)
    return bound


def _operands(q, what: str):
    if not isinstance(q, DfpTensor):
        raise DfpError(f"{what} must be a DfpTensor (see dfpgen.quantize), got {type(q).__name__}")
    return q.mantissa, q.exponent


def conv2d_fwd(xq: DfpTensor, wq: DfpTensor, bias=None, stride=1, padding=0, dilation=1, *,
               c_block: int = 16, flush_taps: int | None = None, saturate: bool = False) -> RefResult:
    """Reference forward of DFP operands X (NCHW) and W (KCRS) with the flush schedule
    (``c_block``, ``flush_taps``) of the module docstring; ``bias`` FP32 (K,) or None.
    Returns :class:`RefResult` with NKPQ arrays."""
    (xm, ex), (wm, ew) = _operands(xq, "X"), _operands(wq, "W")
    exact = conv2d_fwd_int(xm, wm, stride, padding, dilation)
    N, K, P, Q = exact.shape
    sp = _spec(*xm.shape, K, *wm.shape[2:], stride, padding, dilation, "fwd")
    chunks = _channel_tap_chunks(sp.C, sp.R, sp.S, c_block, flush_taps)
    acc, ovf, sat, clip = _run_chunks(_im2col(xm.astype(np.int64), sp), wm.astype(np.int64).reshape(K, -1).T,
                                chunks, ex + ew, saturate)
    if bias is not None:
        b = np.asarray(bias, np.float32)
        if b.shape != (K,):
            raise DfpError(f"forward: bias shape {b.shape} != (K,) = ({K},)")
        acc = acc + b[None, :]
    fp32 = acc.reshape(N, P, Q, K).transpose(0, 3, 1, 2).copy()
    return RefResult(exact, ex + ew, fp32, ovf, sat, len(chunks), clip)


def conv2d_bwd_data(dyq: DfpTensor, wq: DfpTensor, input_hw, stride=1, padding=0, dilation=1, *,
                    k_block: int = 16, flush_taps: int | None = None, saturate: bool = False) -> RefResult:
    """Reference backward-data: DFP dY (NKPQ) and W (KCRS) -> dX NCHW of size ``input_hw``,
    flush schedule (``k_block``, ``flush_taps``) of the module docstring."""
    (dym, ey), (wm, ew) = _operands(dyq, "dY"), _operands(wq, "W")
    exact = conv2d_bwd_data_int(dym, wm, input_hw, stride, padding, dilation)
    sp = _bwd_data_spec(dym, wm, input_hw, stride, padding, dilation)
    chunks = _channel_tap_chunks(sp.K, sp.R, sp.S, k_block, flush_taps)
    b = wm.astype(np.int64).transpose(0, 2, 3, 1).reshape(sp.K * sp.R * sp.S, sp.C)
    acc, ovf, sat, clip = _run_chunks(_gather_dy(dym.astype(np.int64), sp), b, chunks, ey + ew, saturate)
    fp32 = acc.reshape(sp.N, sp.H, sp.W, sp.C).transpose(0, 3, 1, 2).copy()
    return RefResult(exact, ey + ew, fp32, ovf, sat, len(chunks), clip)


def _pixel_chunks(M: int, flush_pixels, what: str = "flush_pixels", row: int | None = None
                  ) -> list[np.ndarray]:
    """Chunks of ``flush_pixels`` consecutive reduction indices 0..M-1, in pair steps. Pairs are
    (m, m+1) with m even counted within rows of ``row`` indices (None: one row of M), as the
    backward-weight kernel pairs output pixels (2j, 2j+1) of an image row: -1 (zero) stands in
    for the half of a pair that lies in the neighbouring chunk (odd intervals) or beyond its
    row (odd Q). The pairing changes nothing in exact arithmetic; a saturating lane clips
    after each pair step, so there it is the kernel's."""
    if flush_pixels is None:
        fp = M + M % 2
    elif isinstance(flush_pixels, (int, np.integer)) and flush_pixels >= 1:
        fp = int(flush_pixels)
    else:
        raise DfpError(f"{what} must be an int >= 1 or None, got {flush_pixels!r}")
    Q = row or M
    chunks = []
    for m0 in range(0, M, fp):
        m1 = min(m0 + fp, M)
        idx, m = [], m0
        while m < m1:
            r, q = divmod(m, Q)
            first = r * Q + q - q % 2  # the pair's even pixel
            second_ok = q - q % 2 + 1 < Q and first + 1 < m1
            idx += [first if first >= m0 else -1, first + 1 if second_ok else -1]
            m = min(first + 2, (r + 1) * Q)
        chunks.append(np.array(idx, np.int64))
    return chunks


def conv2d_bwd_weight(xq: DfpTensor, dyq: DfpTensor, kernel_rs, stride=1, padding=0, dilation=1, *,
                      flush_pixels: int | None = None, saturate: bool = False) -> RefResult:
    """Reference backward-weight: DFP X (NCHW) and dY (NKPQ) -> dW KCRS, one flush per
    ``flush_pixels`` pixels m = (n*P + p)*Q + q (None: one partial over all N*P*Q)."""
    (xm, ex), (dym, ey) = _operands(xq, "X"), _operands(dyq, "dY")
    exact = conv2d_bwd_weight_int(xm, dym, kernel_rs, stride, padding, dilation)
    sp = _bwd_weight_spec(xm, dym, kernel_rs, stride, padding, dilation)
    # the kernel pairs pixels within output rows, except a 1x1 unpadded layer, which it runs
    # as one row of all N*P*Q pixels (dfpgen.bwd_weight.prepare)
    one_row = sp.R == sp.S == 1 and tuple(sp.padding) == (0, 0)
    chunks = _pixel_chunks(sp.N * sp.P * sp.Q, flush_pixels, row=None if one_row else sp.Q)
    a = dym.astype(np.int64).transpose(1, 0, 2, 3).reshape(sp.K, -1)
    acc, ovf, sat, clip = _run_chunks(a, _im2col(xm.astype(np.int64), sp), chunks, ex + ey, saturate)
    return RefResult(exact, ex + ey, acc.reshape(sp.K, sp.C, sp.R, sp.S), ovf, sat, len(chunks), clip)


def gemm(aq: DfpTensor, bq: DfpTensor, *, k_block: int | None = None, saturate: bool = False) -> RefResult:
    """Reference GEMM of DFP A (M x K) and B (K x N), one flush per ``k_block`` values
    of k (None: one partial over all K). A Linear layer ``x @ W.T`` is ``gemm(x, W.T)``."""
    (am, ea), (bm, eb) = _operands(aq, "A"), _operands(bq, "B")
    exact = gemm_int(am, bm)
    chunks = _pixel_chunks(am.shape[1], k_block, "k_block")
    acc, ovf, sat, clip = _run_chunks(am.astype(np.int64), bm.astype(np.int64), chunks, ea + eb, saturate)
    return RefResult(exact, ea + eb, acc, ovf, sat, len(chunks), clip)
