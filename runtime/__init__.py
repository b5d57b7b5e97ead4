"""dfpgen.runtime: the PyTorch binding (the only part of dfpgen that imports torch).

    import dfpgen.runtime as dfp
    model = dfp.convert(model, skip=["conv1", "fc"])   # nn.Conv2d / nn.Linear -> DFP16
    with dfp.enabled(False):                            # A/B: the same model in FP32
        ...

Layers: :class:`DFPConv2d`, :class:`DFPLinear` (drop-ins for ``nn.Conv2d`` / ``nn.Linear``);
functional: :func:`conv2d`, :func:`linear` (custom ops ``torch.ops.dfpgen.conv2d`` /
``torch.ops.dfpgen.linear`` with autograd); settings: :func:`enabled`, :func:`set_enabled`,
:func:`is_enabled` (env ``DFPGEN_DISABLE=1``), :func:`set_default_format`.
"""
from .config import (check_environment, default_format, default_grad_rounding, default_overflow, enabled,
                     is_enabled, nonfinite_policy, set_default_format, set_enabled,
                     set_nonfinite_policy)
from .convert import convert, dfp_layers, revert
from .modules import DfpFallbackWarning, DFPConv2d, DFPLinear
from .nonfinite import NonfiniteStepWarning, nonfinite_events, step_if_finite
from .numerics import NumericsMonitor
from .policy import layer_policies, set_layer_policy
from .ops import conv2d, linear

__all__ = [
    "DFPConv2d", "DFPLinear", "DfpFallbackWarning", "conv2d", "linear", "convert", "revert",
    "dfp_layers", "enabled", "set_enabled", "is_enabled", "set_default_format",
    "default_format", "default_overflow", "default_grad_rounding",
    "NumericsMonitor", "set_nonfinite_policy", "nonfinite_policy", "step_if_finite",
    "nonfinite_events", "NonfiniteStepWarning", "set_layer_policy", "layer_policies",
    "check_environment",
]


def _attach_openmp() -> None:
    # dfpgen's parallel kernels run on PyTorch's OpenMP team, not on a second pool of
    # threads competing with it for the cores (dfpgen/openmp.py says why and how)
    from dfpgen import log, openmp
    from dfpgen.errors import DfpError
    try:
        openmp.attach()
        what = None
    except DfpError as exc:  # an unusable runtime: the Python pool still works
        what = f"not attached ({exc}): Python thread pool"
    try:
        if log.verbose():
            log.line("threads", "openmp", what or openmp.describe())
    except DfpError:  # a bad $DFPGEN_VERBOSE or $DFPGEN_THREADING is reported where it is read for real
        pass


_attach_openmp()
