"""dfpgen: DFP16 (INT16 dynamic fixed point) convolution kernels generated as LLVM IR.

Implements Das et al., *Mixed Precision Training of Convolutional Neural Networks using
Integer Operations* (ICLR 2018). The core package uses numpy, llvmlite and jinja2 only;
the PyTorch binding is ``dfpgen.runtime``.
"""
from importlib import import_module as _import_module

from .errors import CacheWarning, DfpError, KernelBuildError, OverflowWarning, UnderflowWarning

__version__ = "0.1.0"

# Public names resolved on first use, so `import dfpgen` stays cheap (no LLVM start-up)
# and each module owns its own imports.
_LAZY = {
    "DfpFormat": "dfp",
    "DfpTensor": "dfp",
    "quantize": "dfp",
    "dequantize": "dfp",
    "DFP16": "dfp",
    "quantize_pack": "pack",
    "ConvSpec": "spec",
    "parse_layer": "spec",
    "TuningConfig": "tuning",
    "CpuTarget": "target",
    "host_target": "target",
    "get_kernel": "pass_kernels",
    "conv2d": "conv",
    "conv2d_input": "conv",
    "conv2d_weight": "conv",
    "linear": "conv",
    "ConvResult": "conv",
    "RunInfo": "runinfo",
}

__all__ = ["CacheWarning", "DfpError", "KernelBuildError", "OverflowWarning", "UnderflowWarning",
           "__version__", *_LAZY]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dfpgen' has no attribute {name!r}")
    value = getattr(_import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
