"""``convert(model)``: swap the ``nn.Conv2d`` / ``nn.Linear`` layers of a model for
``DFPConv2d`` / ``DFPLinear`` in place, and ``revert`` to undo it.

The swapped layer shares the original's parameters, buffers and hooks (a shallow copy whose
class changes), so an optimizer built before ``convert`` keeps updating the same tensors and
the ``state_dict`` is unchanged.
"""
from __future__ import annotations

import copy
import fnmatch
import re
import warnings
from typing import Callable, Iterable, Optional, Union

from torch import nn

from dfpgen.dfp import DfpFormat

from . import config
from .modules import DfpFallbackWarning, DFPConv2d, DFPLinear, _DfpLayer

Skip = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]
_TO_DFP = {nn.Conv2d: DFPConv2d, nn.Linear: DFPLinear}
_TO_TORCH = {DFPConv2d: nn.Conv2d, DFPLinear: nn.Linear}


def _skip_fn(skip: Skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, m: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"skip patterns must be strings, got {type(p).__name__}")

    def match(name: str, m: nn.Module) -> bool:
        # A pattern is a module name ("conv1", "fc"), a glob ("layer4.*"), or a regular
        # expression written as "re:...": matched against the full dotted name.
        for p in patterns:
            if p.startswith("re:"):
                if re.fullmatch(p[3:], name):
                    return True
            elif name == p or fnmatch.fnmatchcase(name, p):
                return True
        return False
    return match


def convert(model: nn.Module, *, skip: Skip = None, dfp_format: Optional[DfpFormat] = None,
            overflow: Optional[str] = None, grad_rounding: Optional[str] = None,
            threads: int = 0, linear: bool = True, fuse: bool = True) -> nn.Module:
    """Swap every ``nn.Conv2d`` (and ``nn.Linear`` when ``linear``) of ``model`` for its DFP16
    version, in place, and return ``model``.

    ``skip``: layers to keep in FP32 — a name, a glob (``"layer4.*"``), a regex
    (``"re:layer[12]\\..*"``), a list of those, or a predicate ``(name, module) -> bool``.
    ``dfp_format`` / ``overflow`` / ``grad_rounding`` / ``threads`` are set on every swapped
    layer (None: the process default at call time). Only exact ``nn.Conv2d`` / ``nn.Linear``
    instances are swapped: a subclass (``nn.LazyLinear``, a library's own conv class) may
    compute something else in its ``forward``, so it stays as it is. A swapped layer whose
    configuration the kernels do not cover (groups > 1, depthwise, ...) runs in FP32.
    One :class:`DfpFallbackWarning` lists every layer left in FP32 this way and why (layers
    named by ``skip`` are not listed). Raises ``TypeError`` for a bad ``skip``.

    ``fuse`` (default on): conv -> BatchNorm -> ReLU and conv -> BatchNorm -> add -> ReLU
    found by ``torch.fx`` tracing run as one DFP16 pass (``dfpgen.runtime.fuse``); a block
    that does not trace stays unfused with one ``FusionWarning`` naming it. ``state_dict``
    keys do not change. ``fuse=False`` keeps BatchNorm, ReLU and the add in FP32 PyTorch.
    With ``fuse``, ``nn.MaxPool2d`` layers become ``DFPMaxPool2d`` (the same results; autograd
    keeps int32 argmax positions instead of the float32 input and int64 indices).
    """
    if overflow is not None:
        config.check_overflow(overflow)
    if grad_rounding is not None:
        config.check_rounding(grad_rounding)
    skipped = _skip_fn(skip)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in _TO_DFP and (linear or type(m) is not nn.Linear)
               and name and not skipped(name, m)]
    if type(model) in _TO_DFP and not skipped("", model):
        raise TypeError("convert() swaps layers inside a model; wrap a single layer with "
                        "DFPConv2d/DFPLinear instead")
    left = [(name, _subclass_reason(m)) for name, m in model.named_modules()
            if name and _subclass_reason(m) and (linear or not isinstance(m, nn.Linear))
            and not skipped(name, m)]
    for name, m in targets:
        new = copy.copy(m)
        new.__class__ = _TO_DFP[type(m)]
        new._dfp_init(dfp_format, overflow, grad_rounding, threads, name=name)
        reason = new.unsupported_reason()
        if reason is not None:
            new._dfp_announced = reason  # the layer does not warn again at its first call
            left.append((name, reason))
        _set_child(model, name, new)
    if left:
        listing = "; ".join(f"{name!r}: {why}" for name, why in left)
        warnings.warn(f"dfpgen.convert: {len(left)} layer(s) stay in FP32: {listing}",
                      DfpFallbackWarning, stacklevel=2)
    if fuse:
        from .fuse import fuse_batchnorm
        fuse_batchnorm(model)
        from .pool import DFPMaxPool2d
        for name, m in list(model.named_modules()):
            if name and type(m) is nn.MaxPool2d and not m.return_indices:
                new = copy.copy(m)
                new.__class__ = DFPMaxPool2d  # saves int32 argmax positions only (runtime/pool.py)
                _set_child(model, name, new)
    return model


def _subclass_reason(m: nn.Module) -> Optional[str]:
    """Why ``convert`` leaves a subclass of ``nn.Conv2d`` / ``nn.Linear`` alone (None for
    any other module)."""
    if isinstance(m, _DfpLayer) or type(m) in _TO_DFP:
        return None
    for base in _TO_DFP:
        if isinstance(m, base):
            return (f"{type(m).__name__} is a subclass of nn.{base.__name__}, whose forward "
                    "may differ from it, so it is not swapped")
    return None


def revert(model: nn.Module) -> nn.Module:
    """Swap every ``DFPConv2d`` / ``DFPLinear`` back to the PyTorch layer, in place (and
    undo BatchNorm fusion)."""
    from .fuse import unfuse_batchnorm
    from .pool import DFPMaxPool2d
    unfuse_batchnorm(model)
    for name, m in list(model.named_modules()):
        if name and type(m) is DFPMaxPool2d:
            new = copy.copy(m)
            new.__class__ = nn.MaxPool2d
            _set_child(model, name, new)
    for name, m in list(model.named_modules()):
        if name and type(m) in _TO_TORCH:
            new = copy.copy(m)
            for attr in list(vars(new)):
                if attr.startswith("_dfp") or attr in ("dfp_format", "overflow", "grad_rounding",
                                                       "threads", "dfp_name", "dfp_seed"):
                    delattr(new, attr)
            new.__class__ = _TO_TORCH[type(m)]
            _set_child(model, name, new)
    return model


def dfp_layers(model: nn.Module) -> list[tuple[str, _DfpLayer]]:
    """``(name, layer)`` for every DFP16 layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _DfpLayer)]


def _set_child(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
