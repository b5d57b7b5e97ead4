"""``NumericsMonitor``: what DFP16 did to the numbers, per layer and pass, over training steps.

    mon = dfp.NumericsMonitor(model, sample_every=10)
    ... train ...
    print(mon.table()); mon.to_csv("numerics.csv"); mon.plot("numerics.png")

Every DFP layer pass (forward ``fwd``: X, W; backward-data ``bwd_data``: dY, W;
backward-weight ``bwd_weight``: X, dY — Das et al., ICLR 2018, §3-4) reports through the
observer hook of :mod:`dfpgen.runtime.ops`. Per pass and training step the monitor records:

- what ran (:class:`dfpgen.runinfo.RunInfo`): overflow mode (exact / fast), flush interval,
  ISA tier, and ``saturated``: INT32 lanes found saturated at a flush (fast mode);
  the layer's ``last_info[pass_kind]`` is set to the RunInfo as well;
- the shared exponent ``E`` of each of the two quantized operands (every step);
- on sampled steps (every ``sample_every``-th training step, starting with the first):

  * ``headroom``: magnitude bits of the INT16 container that the largest mantissa leaves
    unused, ``15 - bit_length(max |I|)`` (0 for DFP16 with P = 15 and a normal tensor,
    ``15 - P`` for a headroom format ``DfpFormat(bits=P)``; 15 for an all-zero tensor);
  * ``zero``: fraction of the operand's elements whose mantissa is 0;
  * ``underflow``: fraction of the operand's *non-zero* FP32 elements whose mantissa is 0
    (values lost to the shared exponent; ReLU zeros do not count);
  * ``rel_err``: ``||out - ref||_2 / ||ref||_2`` of the pass's FP32 output against PyTorch's
    FP32 computation on the same FP32 inputs (``F.conv2d``, ``torch.nn.grad.conv2d_input``,
    ``conv2d_weight``; a Linear runs as the same 1x1 convolution); 0 when ``ref`` is 0.

A training step starts at each forward of ``model`` in training mode with gradients enabled;
evaluation forwards are not recorded. Sampling keeps an FP32 copy of each layer's input until
its backward, so sampled steps cost memory and one FP32 pass per DFP pass; other steps cost
a few scalar reads.
"""
from __future__ import annotations

import csv
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dfpgen.dfp import DfpTensor, exponent_for, quantize

from . import ops
from .convert import dfp_layers

PASSES = ("fwd", "bwd_data", "bwd_weight")
OPERANDS = {"fwd": ("X", "W"), "bwd_data": ("dY", "W"), "bwd_weight": ("X", "dY")}
INT16_MAGNITUDE_BITS = 15
NAN = float("nan")


@dataclass
class PassRecord:
    """One pass of one layer in one step; NaN where a field was not sampled."""
    step: int
    layer: str
    pass_kind: str
    overflow: str
    flush: int
    saturated: int
    tier: str
    bits: int
    exp_a: int
    exp_b: int
    headroom_a: float = NAN
    headroom_b: float = NAN
    zero_a: float = NAN
    zero_b: float = NAN
    underflow_a: float = NAN
    underflow_b: float = NAN
    rel_err: float = NAN

    @property
    def operands(self) -> tuple[str, str]:
        return OPERANDS[self.pass_kind]


@dataclass
class _Forward:
    layer: str
    step: int
    x: Optional[torch.Tensor] = None  # FP32 input, kept on sampled steps only
    extra: dict = field(default_factory=dict)


def headroom_bits(q: DfpTensor) -> int:
    """``15 - bit_length(max |mantissa|)``: unused magnitude bits of the INT16 container."""
    return INT16_MAGNITUDE_BITS - int(q.max_abs_mantissa).bit_length()


def zero_fractions(q: DfpTensor, a: Optional[np.ndarray]) -> tuple[float, float]:
    """(fraction of zero mantissas, fraction of non-zero FP32 values ``a`` that became 0)."""
    m = q.mantissa
    if m.size == 0:
        return 0.0, 0.0
    zero = m == 0
    zf = float(np.count_nonzero(zero)) / m.size
    if a is None:
        return zf, NAN
    nz = a != 0
    n = np.count_nonzero(nz)
    return zf, (float(np.count_nonzero(zero & nz)) / n if n else 0.0)


def relative_error(out, ref: torch.Tensor) -> float:
    """``||out - ref||_2 / ||ref||_2`` in float64 (0 when both are 0, inf when only ref is)."""
    o = torch.as_tensor(np.array(out, dtype=np.float64)) if not isinstance(out, torch.Tensor) \
        else out.detach().double()
    r = ref.detach().double().reshape(o.shape)
    den = float(torch.linalg.vector_norm(r))
    num = float(torch.linalg.vector_norm(o - r))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


class NumericsMonitor:
    """Collects per-layer, per-pass DFP16 numerics of ``model`` (see the module docstring).

    ``sample_every``: every how many training steps the costly statistics and the FP32
    comparison run (0: never; only RunInfo and exponents are recorded). Use as a context
    manager or call :meth:`close` to detach. Raises ``ValueError`` for a negative
    ``sample_every`` and ``TypeError`` when ``model`` has no DFP layers.
    """

    def __init__(self, model: torch.nn.Module, sample_every: int = 10):
        if int(sample_every) < 0:
            raise ValueError(f"sample_every must be >= 0, got {sample_every}")
        self.model = model
        self.sample_every = int(sample_every)
        self.records: list[PassRecord] = []
        self.step = -1
        self._layers = dict(dfp_layers(model))
        if not self._layers:
            raise TypeError("NumericsMonitor: the model has no DFP layers (run dfp.convert first)")
        self._lock = threading.Lock()
        self._active = False
        self._current: Optional[str] = None
        self._forwards: dict[int, _Forward] = {}
        self._hooks = [model.register_forward_pre_hook(self._on_step)]
        for name, layer in self._layers.items():
            self._hooks.append(layer.register_forward_pre_hook(self._enter(name)))
            self._hooks.append(layer.register_forward_hook(self._leave))
        ops.observers.append(self._on_event)

    # --- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Detach from the model and the ops (records stay)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._on_event in ops.observers:
            ops.observers.remove(self._on_event)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sampled(self, step: int) -> bool:
        return self.sample_every > 0 and step % self.sample_every == 0

    # --- hooks ----------------------------------------------------------------------
    def _on_step(self, module, args):
        self._active = module.training and torch.is_grad_enabled()
        if self._active:
            with self._lock:
                self.step += 1
                # Backward passes of steps two back are done (or never come): drop them.
                self._forwards = {s: f for s, f in self._forwards.items()
                                  if f.step >= self.step - 1}

    def _enter(self, name: str):
        def hook(module, args):
            self._current = name
        return hook

    def _leave(self, module, args, output):
        self._current = None

    def _on_event(self, ev: dict) -> None:
        seed = int(ev["seed"]) if ev.get("seed") is not None else None
        kind = ev["pass_kind"]
        with self._lock:
            if kind == "fwd":
                if not self._active or self._current is None:
                    return
                fw = _Forward(self._current, self.step)
                if seed is not None:
                    self._forwards[seed] = fw
            else:
                fw = self._forwards.get(seed)
                if fw is None:
                    return
        sample = self.sampled(fw.step)
        rec = self._record(fw, kind, ev, sample)
        layer = self._layers.get(fw.layer)
        if layer is not None:
            if not isinstance(getattr(layer, "last_info", None), dict):
                layer.last_info = {}
            layer.last_info[kind] = ev["info"]
        with self._lock:
            self.records.append(rec)

    # --- statistics -------------------------------------------------------------------
    def _record(self, fw: _Forward, kind: str, ev: dict, sample: bool) -> PassRecord:
        info, fmt, weight = ev["info"], ev["fmt"], ev["weight"]
        conv_args = (list(ev["stride"]), list(ev["padding"]), list(ev["dilation"]))
        w_exp = exponent_for(float(weight.detach().abs().max()) if weight.numel() else 0.0, fmt)
        if kind == "fwd":
            a_q, b_exp = ev["x_q"], w_exp
        elif kind == "bwd_data":
            a_q, b_exp = ev["dy_q"], w_exp
        else:
            a_q, b_exp = ev["x_q"], ev["dy_q"].exponent
        rec = PassRecord(fw.step, fw.layer, kind, info.overflow, info.flush, info.saturated,
                         info.tier, fmt.bits, a_q.exponent, b_exp)
        if not sample:
            return rec
        w_np = _np(weight)
        w_q = quantize(w_np, type(fmt)(bits=fmt.bits), name="W")
        if kind == "fwd":
            fw.x = ev["x"].detach().float().clone()
            ops_a = (ev["x_q"], _np(fw.x))
            ops_b = (w_q, w_np)
            ref = F.conv2d(fw.x, weight.detach().float(), None if ev["bias"] is None
                           else ev["bias"].detach().float(), *conv_args)
        elif kind == "bwd_data":
            gy = ev["grad_y"].detach().float()
            ops_a, ops_b = (ev["dy_q"], _np(gy)), (w_q, w_np)
            ref = torch.nn.grad.conv2d_input(tuple(ev["output"].shape), weight.detach().float(),
                                             gy, *conv_args)
        else:
            gy = ev["grad_y"].detach().float()
            ops_a = (ev["x_q"], None if fw.x is None else _np(fw.x))
            ops_b = (ev["dy_q"], _np(gy))
            ref = None if fw.x is None else torch.nn.grad.conv2d_weight(
                fw.x, tuple(weight.shape), gy, *conv_args)
            fw.x = None  # backward-weight runs last: the FP32 copy is not needed any more
        for suffix, (q, a) in (("a", ops_a), ("b", ops_b)):
            zf, uf = zero_fractions(q, a)
            setattr(rec, f"headroom_{suffix}", float(headroom_bits(q)))
            setattr(rec, f"zero_{suffix}", zf)
            setattr(rec, f"underflow_{suffix}", uf)
        if ref is not None:
            rec.rel_err = relative_error(ev["output"], ref)
        return rec

    # --- reports ------------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """One dict per (layer, pass), in model order: steps seen, overflow mode(s), tier,
        flush, total saturated lanes, operand exponents (last, min, max), worst headroom,
        mean zero / underflow fractions and mean / max relative error over sampled steps."""
        order = {name: i for i, name in enumerate(self._layers)}
        groups: dict[tuple[str, str], list[PassRecord]] = {}
        for r in self.records:
            groups.setdefault((r.layer, r.pass_kind), []).append(r)
        rows = []
        for (layer, kind), rs in sorted(groups.items(),
                                        key=lambda kv: (order.get(kv[0][0], 1 << 30),
                                                        PASSES.index(kv[0][1]))):
            row = {"layer": layer, "pass": kind, "operands": "/".join(OPERANDS[kind]),
                   "steps": len(rs), "overflow": "/".join(sorted({r.overflow for r in rs})),
                   "tier": rs[-1].tier, "bits": rs[-1].bits, "flush": rs[-1].flush,
                   "saturated": sum(r.saturated for r in rs)}
            for s in ("a", "b"):
                exps = [getattr(r, f"exp_{s}") for r in rs]
                row[f"exp_{s}"] = (exps[-1], min(exps), max(exps))
                row[f"headroom_{s}"] = _agg(rs, f"headroom_{s}", min)
                row[f"zero_{s}"] = _agg(rs, f"zero_{s}", _mean)
                row[f"underflow_{s}"] = _agg(rs, f"underflow_{s}", _mean)
            row["rel_err"] = _agg(rs, "rel_err", _mean)
            row["rel_err_max"] = _agg(rs, "rel_err", max)
            rows.append(row)
        return rows

    def table(self) -> str:
        """The summary as a fixed-width text table (one line per layer and pass)."""
        head = ("layer", "pass", "mode", "sat", "E a (min..max)", "E b (min..max)", "hdrm",
                "zero a/b", "uflow a/b", "rel err", "max rel err")
        lines = []
        for r in self.summary():
            ea, eb = r["exp_a"], r["exp_b"]
            lines.append((
                r["layer"], f"{r['pass']} {r['operands']}", r["overflow"], str(r["saturated"]),
                f"{ea[0]} ({ea[1]}..{ea[2]})", f"{eb[0]} ({eb[1]}..{eb[2]})",
                f"{_fmt(r['headroom_a'], 'g')}/{_fmt(r['headroom_b'], 'g')}",
                f"{_fmt(r['zero_a'], '.3f')}/{_fmt(r['zero_b'], '.3f')}",
                f"{_fmt(r['underflow_a'], '.2e')}/{_fmt(r['underflow_b'], '.2e')}",
                _fmt(r["rel_err"], ".2e"), _fmt(r["rel_err_max"], ".2e")))
        widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
                  for i, h in enumerate(head)]
        fmt_line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        steps = self.step + 1
        title = (f"DFP16 numerics: {steps} training step(s), sampled every {self.sample_every} "
                 f"(a/b = the pass's two operands; E = shared exponent; hdrm = unused magnitude bits)")
        return "\n".join([title, fmt_line(head), fmt_line(["-" * w for w in widths]),
                          *map(fmt_line, lines)])

    def to_csv(self, path) -> None:
        """One row per recorded pass (all :class:`PassRecord` fields; NaN: not sampled)."""
        names = list(PassRecord.__dataclass_fields__)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            for r in self.records:
                w.writerow(asdict(r))

    def plot(self, path) -> None:
        """PNG (matplotlib Agg): operand exponents over steps (one line per layer and
        operand), saturated lanes per step, relative error vs FP32 on sampled steps."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(2, 3, figsize=(16, 8), constrained_layout=True)
        for col, kind in enumerate(PASSES):
            rs = [r for r in self.records if r.pass_kind == kind]
            ax = axes[0, col]
            for layer in dict.fromkeys(r.layer for r in rs):
                lr = [r for r in rs if r.layer == layer]
                for s, opname in zip(("a", "b"), OPERANDS[kind]):
                    ax.plot([r.step for r in lr], [getattr(r, f"exp_{s}") for r in lr],
                            lw=0.8, label=f"{layer} {opname}")
            ax.set_title(f"{kind}: shared exponents")
            ax.set_xlabel("step")
            if rs and len({r.layer for r in rs}) <= 8:
                ax.legend(fontsize=6)
            ax = axes[1, col]
            sampled = [r for r in rs if not math.isnan(r.rel_err)]
            for layer in dict.fromkeys(r.layer for r in sampled):
                lr = [r for r in sampled if r.layer == layer]
                ax.semilogy([r.step for r in lr], [max(r.rel_err, 1e-12) for r in lr],
                            marker=".", lw=0.8, label=layer)
            sat = {}
            for r in rs:
                sat[r.step] = sat.get(r.step, 0) + r.saturated
            if any(sat.values()):
                ax2 = ax.twinx()
                ax2.bar(list(sat), list(sat.values()), color="red", alpha=0.3)
                ax2.set_ylabel("saturated lanes")
            ax.set_title(f"{kind}: relative error vs FP32")
            ax.set_xlabel("step")
        fig.savefig(path, dpi=90)
        plt.close(fig)


def _mean(vals):
    return sum(vals) / len(vals)


def _agg(rs, attr, fn) -> float:
    vals = [getattr(r, attr) for r in rs if not math.isnan(getattr(r, attr))]
    return fn(vals) if vals else NAN


def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
