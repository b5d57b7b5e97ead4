"""Exceptions and warnings raised by dfpgen."""
import contextlib
import threading


class DfpError(ValueError):
    """Bad input to a DFP16 operation: NaN/Inf operands, shapes that do not agree,
    an exponent outside the format's range, a malformed layer string."""


class OverflowWarning(RuntimeWarning):
    """INT32 lanes saturated in a fast-mode (``vpdpwssds``) kernel; the message gives the count."""


class UnderflowWarning(RuntimeWarning):
    """A tensor is so small (max |x| < 2**-114 for DFP16) that its shared exponent had to be
    clamped at the format's minimum -128: its mantissas keep fewer than the format's bits,
    and values below 2**-129 quantize to zero."""


class KernelBuildError(RuntimeError):
    """Generated IR failed to parse, verify or compile (a generator bug, never a user error)."""


class CacheWarning(UserWarning):
    """The on-disk cache could not be read or written; dfpgen carried on in memory or rebuilt."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` called from here that names the first frame
    outside dfpgen's packages (``dfpgen``, ``dfpgen.runtime``) and PyTorch's (whose autograd
    and custom-op layers sit between a training script and the runtime): the user's line that
    led to the warning, however deep it was raised."""
    import os
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    ours = (here + os.sep, os.path.join(os.path.dirname(here), "runtime") + os.sep)
    torch = sys.modules.get("torch")  # never imported here: the core does not need torch
    if torch is not None and getattr(torch, "__file__", None):
        ours += (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


_sink = threading.local()


def warn(message: str, category: type[Warning]) -> None:
    """:func:`warnings.warn` naming the user's line (:func:`caller_stacklevel`); inside
    :func:`deferred_warnings` (a worker thread, whose stack never reaches the user's code) the
    warning is kept for the calling thread to issue."""
    import warnings
    sink = getattr(_sink, "items", None)
    if sink is not None:
        sink.append((message, category))
        return
    warnings.warn(message, category, stacklevel=caller_stacklevel())


@contextlib.contextmanager
def deferred_warnings():
    """``with deferred_warnings() as kept:`` collects what :func:`warn` is asked to issue in this
    thread; the thread that started the work passes ``kept`` to :func:`reissue`."""
    prev, _sink.items = getattr(_sink, "items", None), []
    try:
        yield _sink.items
    finally:
        _sink.items = prev


def reissue(kept: list) -> None:
    """Issue warnings collected by :func:`deferred_warnings`, from the calling thread."""
    for message, category in kept:
        warn(message, category)
