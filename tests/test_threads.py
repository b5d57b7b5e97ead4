"""Work splitting: forward and backward-data results (and saturation counts) are
bit-identical for 1, 2 and 3 threads; parallel_for covers every work item exactly once."""
import threading
import warnings

import numpy as np
import pytest

import dfpgen
from dfpgen import conv
from dfpgen.threads import parallel_for, split
from conv_cases import operands

SHAPE = (3, 10, 7, 13, 72, 3, 3, 1, 1, 1)   # 5 output-channel blocks: rows x blocks work items
STRIDED = (2, 6, 9, 11, 20, 3, 3, 2, 1, 1)


@pytest.mark.parametrize("shape, mode, adversarial", [(SHAPE, "exact", False), (SHAPE, "fast", False),
                                                      (SHAPE, "fast", True), (STRIDED, "exact", False)])
def test_thread_count_does_not_change_bits(shape, mode, adversarial):
    n, c, h, w, k, r, s, u, p, d = shape
    xq, wq, dyq = operands(shape, seed=4, adversarial=adversarial)
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dfpgen.OverflowWarning)
        for t in (1, 2, 3):
            y, yi = conv.conv2d(xq, wq, None, u, p, d, overflow=mode, threads=t, return_info=True)
            dx, di = conv.conv2d_input((n, c, h, w), wq, dyq, u, p, d, overflow=mode, threads=t,
                                       return_info=True)
            assert yi.threads == di.threads == t
            outs.append((y, dx, yi.saturated, di.saturated))
    for y, dx, sy, sd in outs[1:]:
        assert np.array_equal(y, outs[0][0]) and np.array_equal(dx, outs[0][1])
        assert (sy, sd) == outs[0][2:]
    assert (outs[0][2] > 0) == adversarial


@pytest.mark.parametrize("total, threads", [(1, 4), (7, 2), (100, 3), (5, 5)])
def test_parallel_for_covers_each_item_once(total, threads):
    seen = np.zeros(total, np.int64)
    lock = threading.Lock()

    def fn(b, e):
        with lock:
            seen[b:e] += 1
    parallel_for(total, fn, threads)
    assert (seen == 1).all()
    assert sum(e - b for b, e in split(total, threads)) == total


def test_config_threads_is_the_default_thread_count():
    from dfpgen.tuning import TuningConfig
    xq, wq, _ = operands(SHAPE, seed=6)
    cfg = TuningConfig(k_vecs=1, pixels=13, c_block=16, threads=3)
    _, info = conv.conv2d(xq, wq, padding=1, config=cfg, overflow="exact", return_info=True)
    assert info.threads == 3
    _, info = conv.conv2d(xq, wq, padding=1, config=cfg, threads=1, overflow="exact", return_info=True)
    assert info.threads == 1
