"""NaN / Inf in a DFP16 layer: raise an error naming the layer and pass, or skip the step.

DFP16 has no encoding for NaN or Inf (one shared exponent, INT16 mantissas: docs/ARCHITECTURE.md §1), so a
non-finite operand can never be quantized. What happens is the user's choice,
:func:`dfpgen.runtime.set_nonfinite_policy`:

- ``"raise"`` (default): :class:`dfpgen.DfpError` whose message starts with
  ``dfpgen layer '<name>' <pass>:`` and then says which operand held how many NaN / Inf and
  where the first one is. The forward pass checks X and W (``pass`` is ``fwd``); the backward
  passes check dY (``pass`` is ``bwd_data/bwd_weight``: both read the same quantized dY).
- ``"skip"`` — in the spirit of AMP's ``GradScaler`` (``torch.amp.GradScaler.step`` skips
  ``optimizer.step()`` when it found Inf/NaN gradients): a forward whose X or W is not
  finite runs the FP32 PyTorch op instead (its output carries the NaN/Inf on, as an FP32
  layer would); a backward whose dY is not finite gets zeros for dY, so the layer's dX and
  dW are zero. Each occurrence is recorded as a :class:`NonfiniteEvent`.
  :func:`step_if_finite` then replaces ``optimizer.step()``: when anything was recorded or
  any gradient is not finite, it zeros the gradients, skips the update, warns one
  :class:`NonfiniteStepWarning` listing the layers and passes, and returns False.

A conv's backward finds a non-finite dY when it quantizes it (the max-abs pass meets the
NaN/Inf) and applies the policy then, with the layer's name; for other layers a hook on the
output checks dY first: one ``sum`` over dY (NaN/Inf make the sum non-finite); only when the
sum is not finite, which also happens when large finite values overflow it, is ``isfinite``
evaluated element-wise.
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from dfpgen.errors import DfpError

from . import config

BWD_PASSES = "bwd_data/bwd_weight"


class NonfiniteEvent(NamedTuple):
    """One skipped pass: layer name, pass (``fwd`` or ``bwd_data/bwd_weight``), details."""
    layer: str
    pass_kind: str
    detail: str


class NonfiniteStepWarning(RuntimeWarning):
    """:func:`step_if_finite` skipped an optimizer step because of NaN/Inf values."""


_lock = threading.Lock()
_events: list[NonfiniteEvent] = []


def nonfinite_events() -> list[NonfiniteEvent]:
    """The events recorded since the last :func:`step_if_finite` / :func:`clear_events`."""
    with _lock:
        return list(_events)


def clear_events() -> None:
    with _lock:
        _events.clear()


def _record(layer: str, pass_kind: str, detail: str) -> None:
    with _lock:
        _events.append(NonfiniteEvent(layer, pass_kind, detail))


def _all_finite(t: Tensor | None) -> bool:
    if t is None:
        return True
    t = t.detach()
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        # Same elements as a contiguous NHWC view: PyTorch's full sum of a channels_last
        # tensor took 1-5 ms on a (64, 16, 28, 28) dY, the view's 0.04 ms (measured).
        t = t.permute(0, 2, 3, 1)
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _describe(t: Tensor, what: str) -> str:
    t = t.detach()
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    bad = (~torch.isfinite(t)).reshape(-1).nonzero()
    first = tuple(int(i) for i in torch.unravel_index(bad[0, 0], t.shape)) if bad.numel() else ()
    return (f"{what} {tuple(t.shape)} holds {nan} NaN and {inf} Inf value(s) "
            f"(first at index {first}); DFP16 cannot represent them")


def layer_name(layer) -> str:
    return getattr(layer, "dfp_name", None) or f"{type(layer).__name__}({layer.extra_repr()})"


def guarded_forward(layer, x: Tensor, run_dfp: Callable[[], Tensor],
                    run_fp32: Callable[[], Tensor]) -> Tensor:
    """Run ``layer``'s DFP16 forward under the non-finite policy (see the module docstring).

    A :class:`DfpError` from the forward is re-raised with the layer name and pass; with
    policy ``"skip"`` and a non-finite X, W or bias, ``run_fp32()`` runs instead. The
    output gets a gradient hook that checks dY before the backward passes quantize it.
    """
    if torch.compiler.is_compiling():
        if config.nonfinite_policy() == "skip":
            # "skip" needs Python around the op (catch the error, run FP32 instead, a hook on
            # dY): run this layer eagerly, a graph break. Dynamo guards on the policy, so a
            # model compiled under "raise" is recompiled when the policy changes.
            return _guarded_eager(layer, x, run_dfp, run_fp32)
        # "raise": the ops still raise DfpError on NaN/Inf inside the graph; the layer-named
        # message and the dY hook are eager-only (Dynamo cannot trace the name's f-string).
        return run_dfp()
    return _guarded(layer, x, run_dfp, run_fp32)


def _guarded(layer, x: Tensor, run_dfp: Callable[[], Tensor],
             run_fp32: Callable[[], Tensor]) -> Tensor:
    # the layer's name (an extra_repr string) is built only when a message needs it: on
    # every forward it cost a few percent of a small layer's call
    try:
        y = run_dfp()
    except DfpError as exc:
        name = layer_name(layer)
        operands = (("input X", x), ("weight W", layer.weight), ("bias", layer.bias))
        bad = [(what, t) for what, t in operands if not _all_finite(t)]
        if bad and config.nonfinite_policy() == "skip":
            _record(name, "fwd", "; ".join(_describe(t, what) for what, t in bad))
            return run_fp32()
        raise DfpError(f"dfpgen layer {name!r} fwd: {exc}") from exc
    if y.requires_grad and not torch.compiler.is_compiling():
        node = y.grad_fn
        if getattr(node, "dfp_checks_dy", False):
            # the op's backward applies the policy itself when quantizing dY finds NaN/Inf
            # (no extra read of every dY to look for them)
            node.dfp_layer = layer
        else:
            y.register_hook(lambda g: _check_grad(layer, g))
    return y


_guarded_eager = torch.compiler.disable(_guarded, recursive=True)


def _check_grad(layer, g: Tensor):
    """None for a finite dY ``g``; else the policy: record the event and return zeros for dY
    (``"skip"``) or raise :class:`DfpError` naming ``layer`` (a module, or its name)."""
    if _all_finite(g):
        return None
    name = layer if isinstance(layer, str) else layer_name(layer)
    detail = _describe(g, "grad_output dY")
    if config.nonfinite_policy() == "skip":
        _record(name, BWD_PASSES, detail)
        return torch.zeros_like(g)
    raise DfpError(f"dfpgen layer {name!r} {BWD_PASSES}: {detail}")


def step_if_finite(optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer.step()`` unless this step saw NaN/Inf (recorded events or non-finite
    ``.grad`` of any parameter of ``optimizer``): then zero the gradients, skip the update,
    warn :class:`NonfiniteStepWarning` naming the layers and passes, and return False.
    Returns True when the step ran. Clears the recorded events either way."""
    events = nonfinite_events()
    clear_events()
    bad_params = sum(1 for group in optimizer.param_groups for p in group["params"]
                     if p.grad is not None and not _all_finite(p.grad))
    if not events and not bad_params:
        optimizer.step()
        return True
    where = ", ".join(f"{e.layer} {e.pass_kind}" for e in events) or "no DFP layer"
    warnings.warn(f"dfpgen: optimizer step skipped: non-finite values in {where}; "
                  f"{bad_params} parameter gradient(s) not finite", NonfiniteStepWarning,
                  stacklevel=2)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.zero_()
    return False
