"""Backward-data as stride-1 sub-convolutions over dY, one per output phase (pure planner).

``dX[n,c,h,w] = sum_{k,r,s} dY[n,k,p,q] W[k,c,r,s]`` with ``p = (h + pad_h - r d_h) / u_h``
(and q likewise) when integral and in range. For stride u > 1 a dilated forward over a
zero-stuffed dY would waste (u_h u_w - 1)/(u_h u_w) of the work; instead the output rows
``h = a + u_h i`` of phase ``a`` only meet the taps r with ``(a + pad_h - r d_h) mod u_h = 0``,
at ``p = i + off_r``, ``off_r = (a + pad_h - r d_h) / u_h``: a stride-1 correlation of dY
(padded by ``top``/``bottom`` rows of zeros so every ``i + off_r`` is inside the buffer) with
the phase's sub-filter, writing every u_h-th row (and u_w-th column) of dX. Stride 1 is the
single phase (0, 0) with all taps: the flipped, transposed filter.

Taps keep the reference's order (original, unflipped (r, s)) and its flush groups (tap index
``r*S + s`` divided by ``flush_taps``), so a phase flushes after the same taps as
``dfpgen.reference.conv2d_bwd_data``; a group with no tap in the phase adds nothing.
"""
from __future__ import annotations

from .errors import DfpError
from .plan import ConvPassPlan, SubConv, SubTap, plan_kernel, resolve_flush_taps, spec_label, tap_groups
from .tuning import TuningConfig


def _axis_phases(n_in: int, n_out: int, u: int, pad: int, d: int, taps: int):
    """Per phase a: (rows in phase, {tap: offset}); plus the (before, after) padding of dY."""
    phases, before, after = [], 0, 0
    for a in range(u):
        count = len(range(a, n_in, u))
        offs = {r: (a + pad - r * d) // u for r in range(taps) if (a + pad - r * d) % u == 0}
        phases.append((count, offs))
        if count:
            for off in offs.values():
                before = max(before, -off)
                after = max(after, count - 1 + off - (n_out - 1))
    return phases, before, after


def dy_padding(spec) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the zero padding of dY in the backward-data kernels' input
    buffer (:attr:`ConvPassPlan.pad` of :func:`plan_bwd_data`), from the layer's geometry
    alone, so that dY can be quantized straight into it (``dfpgen.pack.quantize_padded``)."""
    (uh, uw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    _, top, bottom = _axis_phases(spec.H, spec.P, uh, ph, dh, spec.R)
    _, left, right = _axis_phases(spec.W, spec.Q, uw, pw, dw, spec.S)
    return top, bottom, left, right


def plan_bwd_data(spec, config: TuningConfig, target, *, mode: str = "fast", fma: bool = True) -> ConvPassPlan:
    """Plan the backward-data pass of ``spec`` (``pass_kind == "bwd_data"``): reduction over K
    (``config.c_block`` is the reference's ``k_block``), output vectors over C."""
    if spec.pass_kind != "bwd_data":
        raise DfpError(f"plan_bwd_data needs a bwd_data spec, got {spec.pass_kind!r}")
    (uh, uw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    ft = resolve_flush_taps(config, spec.R * spec.S, mode)
    groups = tap_groups([(r, s) for r in range(spec.R) for s in range(spec.S)], ft)
    rows, top, bottom = _axis_phases(spec.H, spec.P, uh, ph, dh, spec.R)
    cols, left, right = _axis_phases(spec.W, spec.Q, uw, pw, dw, spec.S)
    in_h, in_w = spec.P + top + bottom, spec.Q + left + right
    label = spec_label(spec)
    phases, zero_fill = [], False
    for a, (ha, roffs) in enumerate(rows):
        for b, (wb, soffs) in enumerate(cols):
            if not ha or not wb:
                continue
            taps = tuple(SubTap(r, s, roffs[r] + top, soffs[s] + left, groups[(r, s)])
                         for r in range(spec.R) for s in range(spec.S) if r in roffs and s in soffs)
            if not taps:
                zero_fill = True
                continue
            sub = SubConv(name=f"ph{a}x{b}", in_h=in_h, in_w=in_w, red=spec.K, out=spec.C,
                          rows=ha, cols=wb, row_step=1, col_step=1, taps=taps,
                          out_h=spec.H, out_w=spec.W, oh0=a, ow0=b, ohs=uh, ows=uw)
            sfx = f"_ph{a}x{b}" if (uh, uw) != (1, 1) else ""
            phases.append((sub, plan_kernel(sub, config, target, mode=mode, flush_taps=ft,
                                            has_bias=False, pass_kind="bwd_data", label=label + sfx,
                                            fma=fma)))
    return ConvPassPlan((top, bottom, left, right), tuple(phases), zero_fill, ft, transposed=True)
