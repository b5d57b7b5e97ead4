"""The pass registry: one record per convolution pass, read by everything that has to treat
the three passes differently (docs/ARCHITECTURE.md §2).

A :class:`ConvPass` says, for one pass, what the kernel cache, the tuner, the CLI and the
public API need to know: its heuristic schedule and search space, how to plan its kernels and
which template renders them, which config fields may change its output bits, whether exact
mode picks the schedule from the operands, which numpy API function runs it and with which
arguments, and how PyTorch computes the same pass (for the comparison columns). Code above
this module asks ``passes.get(spec.pass_kind)`` instead of testing a pass name; adding a pass
means adding a record here (and its planner and execution module).

What planners below this module need of a pass (the channels it reduces over and writes) is
the spec's own geometry: ``ConvSpec.reduction_size``, ``tile_channels``, ``tile_row``,
``result_shape`` (dfpgen/spec.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import plan_bwd_weight, reference, tuning
from .errors import DfpError
from .plan import ConvPassPlan, plan_fwd_pass
from .plan_bwd_data import plan_bwd_data
from .spec import OVERFLOW_MODES, PASSES, ConvSpec
from .target import CpuTarget
from .tuning import TuningConfig

@dataclass(frozen=True)
class ConvPass:
    """Everything pass-specific above the planners.

    - ``name``: ``"fwd" | "bwd_data" | "bwd_weight"`` (``ConvSpec.pass_kind``); ``title``:
      how messages spell it.
    - ``default_config(spec, target)``: the heuristic :class:`TuningConfig`;
      ``search_space(spec, target)``: the legal configs the tuner may time, default first.
    - ``plan_pass(spec, config, target, overflow, **variant)``: the pass's plan (variant:
      ``has_bias`` and ``fma`` for the forward family, ``scaled`` for backward-weight; a
      :class:`dfpgen.plan.ConvPassPlan` for the forward family, a
      :class:`dfpgen.plan_bwd_weight.BwdWeightPlan` for backward-weight), raising :class:`DfpError`
      when ``config`` cannot be planned; ``template``: the Jinja file that renders one kernel.
    - ``family``: the execution module of the pass (``"fwd_family"``: :mod:`dfpgen.fwd_family`
      for forward and backward-data, ``"bwd_weight"``: :mod:`dfpgen.bwd_weight`).
    - ``schedule_from_operands``: in exact mode the reduction block and flush interval come
      from the operands' maxima (``dfpgen.plan_exact.exact_schedule``), so a config's
      ``c_block`` / ``flush`` do not choose the kernel's bits; backward-weight proves its
      flush interval in pixels instead (``dfpgen.plan_exact.exact_flush``) and blocks by it.
    - ``fast_bit_fields``: config fields that set the output bits in fast mode (and, for a
      pass that does not schedule from operands, in exact mode too).
    - ``api`` / ``api_args``: the :mod:`dfpgen.conv` function running the pass and its
      positional arguments (``x``, ``w``, ``dy``: operands; ``*_shape``: the spec's shapes).
    - ``torch_grad_mask``: ``aten.convolution_backward``'s output mask computing this pass
      (``None``: forward, ``torch.nn.functional.conv2d``).
    - ``cost_pixels(spec)``: the pixel extent the tuner's cost model divides into blocks.
    - ``weight_bound_axes``: how the exact-mode bound reads the KRSC weight as
      (taps, OUT, RED); ``None`` where the pass has no weight operand.
    - ``reference(spec, ops, info, saturate)``: the golden model's result
      (:mod:`dfpgen.reference`) of the pass on operands ``ops`` (``x``, ``w``, ``dy``) under
      the flush schedule a run reported in ``info`` (a :class:`dfpgen.runinfo.RunInfo`).
    - ``tap_density(spec)``: the fraction of taps an output pixel meets (backward-data with
      stride > 1 meets 1 / (u_h u_w) of them per phase), for the exact schedule's cost.
    """
    name: str
    title: str
    default_config: Callable[[ConvSpec, CpuTarget], TuningConfig]
    search_space: Callable[[ConvSpec, CpuTarget], list]
    plan_pass: Callable[..., object]
    template: str
    family: str
    schedule_from_operands: bool
    fast_bit_fields: tuple[str, ...]
    api: str
    api_args: tuple[str, ...]
    torch_grad_mask: tuple[bool, bool, bool] | None
    cost_pixels: Callable[[ConvSpec], int]
    weight_bound_axes: tuple[int, int, int] | None
    tap_density: Callable[[ConvSpec], float]
    reference: Callable[..., object]

    def bit_fields(self, overflow: str) -> tuple[str, ...]:
        """Config fields that may change the output bits under ``overflow``: none in exact
        mode for a pass whose schedule comes from the operands."""
        if overflow == "exact" and self.schedule_from_operands:
            return ()
        return self.fast_bit_fields


    def kernel_plans(self, spec: ConvSpec, config: TuningConfig, target: CpuTarget,
                     overflow: str = "fast") -> list:
        """The plan of every kernel of one pass (each has ``symbol``; forward: one,
        backward-data with stride > 1: one per output phase, backward-weight: one)."""
        p = self.plan_pass(spec, config, target, overflow)
        return [plan for _, plan in p.phases] if isinstance(p, ConvPassPlan) else [p]


def _plan_fwd(spec, config, target, overflow="fast", *, has_bias=False, fma=True) -> ConvPassPlan:
    return plan_fwd_pass(spec, config, target, mode=overflow, has_bias=has_bias, fma=fma)


def _plan_bwd_data(spec, config, target, overflow="fast", *, has_bias=False, fma=True) -> ConvPassPlan:
    if has_bias:
        raise DfpError("backward-data has no bias")
    return plan_bwd_data(spec, config, target, mode=overflow, fma=fma)


def _plan_bwd_weight(spec, config, target, overflow="exact", *, scaled=False):
    return plan_bwd_weight.plan(spec, config, target, overflow, scaled)


def _ref_fwd(s: ConvSpec, ops: dict, info, saturate: bool = False):
    return reference.conv2d_fwd(ops["x"], ops["w"], None, s.stride, s.padding, s.dilation,
                                c_block=info.c_block, flush_taps=info.flush_taps, saturate=saturate)


def _ref_bwd_data(s: ConvSpec, ops: dict, info, saturate: bool = False):
    return reference.conv2d_bwd_data(ops["dy"], ops["w"], (s.H, s.W), s.stride, s.padding, s.dilation,
                                     k_block=info.c_block, flush_taps=info.flush_taps, saturate=saturate)


def _ref_bwd_weight(s: ConvSpec, ops: dict, info, saturate: bool = False):
    return reference.conv2d_bwd_weight(ops["x"], ops["dy"], (s.R, s.S), s.stride, s.padding, s.dilation,
                                       flush_pixels=info.flush or None, saturate=saturate)


_REGISTRY = {p.name: p for p in (
    ConvPass(name="fwd", title="forward",
             default_config=tuning.default_config, search_space=tuning.search_space,
             plan_pass=_plan_fwd, template="conv_fwd.ll.j2", family="fwd_family", schedule_from_operands=True,
             fast_bit_fields=("c_block", "flush"), api="conv2d", api_args=("x", "w"),
             torch_grad_mask=None, cost_pixels=lambda s: s.Q, weight_bound_axes=(1, 0, 2),
             tap_density=lambda s: 1.0, reference=_ref_fwd),
    ConvPass(name="bwd_data", title="backward-data",
             default_config=tuning.default_config, search_space=tuning.search_space,
             plan_pass=_plan_bwd_data, template="conv_fwd.ll.j2", family="fwd_family", schedule_from_operands=True,
             fast_bit_fields=("c_block", "flush"), api="conv2d_input", api_args=("input_shape", "w", "dy"),
             torch_grad_mask=(True, False, False), cost_pixels=lambda s: s.W, weight_bound_axes=(1, 2, 0),
             tap_density=lambda s: 1.0 / (s.stride[0] * s.stride[1]), reference=_ref_bwd_data),
    ConvPass(name="bwd_weight", title="backward-weight",
             default_config=plan_bwd_weight.default_config, search_space=plan_bwd_weight.search_space,
             plan_pass=_plan_bwd_weight, template="conv_bwd_weight.ll.j2", family="bwd_weight",
             schedule_from_operands=False,
             fast_bit_fields=("flush",), api="conv2d_weight", api_args=("x", "weight_shape", "dy"),
             torch_grad_mask=(False, True, False), cost_pixels=lambda s: s.C, weight_bound_axes=None,
             tap_density=lambda s: 1.0, reference=_ref_bwd_weight),
)}
assert tuple(_REGISTRY) == PASSES


def get(name: str) -> ConvPass:
    """The record of pass ``name``. Raises :class:`DfpError` naming the known passes."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DfpError(f"pass must be one of {PASSES}, got {name!r}") from None


def of(spec: ConvSpec) -> ConvPass:
    """The record of ``spec``'s pass."""
    return _REGISTRY[spec.pass_kind]


def check_overflow(overflow) -> str:
    """``overflow`` if it is an overflow mode, else a :class:`DfpError` naming the modes."""
    if overflow not in OVERFLOW_MODES:
        raise DfpError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    return overflow


