"""Overflow policy per layer: choose, by layer name, the overflow mode (``"exact"``: proven
flush interval, bit-exact with ``dfpgen.reference``; ``"fast"``: the paper's long saturating
chains, saturated lanes counted) and the format (``DfpFormat(bits=P)``: fewer magnitude bits
leave headroom in the INT16 container, so fast-mode chains saturate later).

    dfp.set_layer_policy(model, {"conv1": dict(overflow="exact"),
                                 "layer4.*": dict(dfp_format=DfpFormat(bits=13), overflow="fast")})

What each layer then ran is recorded per pass by :class:`dfpgen.runtime.NumericsMonitor`
(``layer.last_info[pass_kind]`` is the pass's :class:`dfpgen.runinfo.RunInfo`). The measured
trade-off behind the defaults is in benchmarks/RESULTS.md (section ``numerics``).
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import nn

from dfpgen.dfp import DfpFormat
from dfpgen.errors import DfpError

from . import config
from .convert import _skip_fn, dfp_layers

_KEYS = ("dfp_format", "overflow", "grad_rounding")


def set_layer_policy(model: nn.Module, rules: Mapping[str, Mapping]) -> list[str]:
    """Apply ``rules`` (``{pattern: {"dfp_format": DfpFormat | None, "overflow": str | None,
    "grad_rounding": str | None}}``) to the DFP layers of ``model``, in order, so later rules
    win. A pattern is a layer name, a glob (``"layer4.*"``) or ``"re:<regex>"``, matched
    against the dotted name as in :func:`dfpgen.runtime.convert`'s ``skip``; ``None`` values
    return the layer to the process default. Returns the names of the layers changed.

    Raises :class:`dfpgen.DfpError` for an unknown key or value, or a pattern that matches no
    DFP layer (a typo would otherwise leave a layer on a policy nobody chose).
    """
    layers = dfp_layers(model)
    changed: list[str] = []
    for pattern, settings in rules.items():
        unknown = set(settings) - set(_KEYS)
        if unknown:
            raise DfpError(f"set_layer_policy: unknown setting(s) {sorted(unknown)}; "
                           f"expected {_KEYS}")
        fmt: Optional[DfpFormat] = settings.get("dfp_format")
        if fmt is not None and not isinstance(fmt, DfpFormat):
            raise DfpError(f"set_layer_policy: dfp_format must be a DfpFormat, got {fmt!r}")
        if settings.get("overflow") is not None:
            config.check_overflow(settings["overflow"])
        if settings.get("grad_rounding") is not None:
            config.check_rounding(settings["grad_rounding"])
        match = _skip_fn(pattern)
        hits = [(name, layer) for name, layer in layers if match(name, layer)]
        if not hits:
            raise DfpError(f"set_layer_policy: pattern {pattern!r} matches no DFP layer of the "
                           f"model (layers: {', '.join(n for n, _ in layers) or 'none'})")
        for name, layer in hits:
            for key, value in settings.items():
                setattr(layer, key, value)
            if name not in changed:
                changed.append(name)
    return changed


def layer_policies(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"bits", "rounding", "overflow", "grad_rounding"}}`` as each DFP layer
    would run now (per-layer settings, else the process defaults)."""
    out = {}
    for name, layer in dfp_layers(model):
        fmt = layer.dfp_format or config.default_format()
        out[name] = {"bits": fmt.bits, "rounding": fmt.rounding,
                     "overflow": layer.overflow or config.default_overflow(),
                     "grad_rounding": layer.grad_rounding or config.default_grad_rounding()}
    return out
