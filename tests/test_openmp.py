"""Kernels on the process's OpenMP team (dfpgen/openmp.py): the generated launcher gives each
thread the range threads.split gives it, moves the per-thread pointer, collects return values,
and every pass gives the same bits and saturation counts on the team as on the Python pool."""
import ctypes
import os
import warnings

import numpy as np
import pytest

import dfpgen
import dfpgen.runtime  # noqa: F401  (attaches PyTorch's OpenMP runtime)
from dfpgen import bn, conv, jit, openmp, pack
from dfpgen.dfp import DFP16
from dfpgen.threads import parallel_call, split
from conv_cases import operands

# out[i] = begin * 1000 + tag for i in [begin, end); *counter += end - begin; returns begin
_MARK_IR = """
define i64 @dfpgen_test_mark(ptr %out, i64 %b, i64 %e, i64 %tag, ptr %counter, double %d, float %f) {
entry:
  %c0 = load i64, ptr %counter, align 8
  %len = sub i64 %e, %b
  %c1 = add i64 %c0, %len
  %fi = fptosi float %f to i64
  %di = fptosi double %d to i64
  %c2 = add i64 %c1, %fi
  %c3 = add i64 %c2, %di
  store i64 %c3, ptr %counter, align 8
  %v0 = mul i64 %b, 1000
  %v = add i64 %v0, %tag
  br label %loop
loop:
  %i = phi i64 [ %b, %entry ], [ %i1, %body ]
  %more = icmp slt i64 %i, %e
  br i1 %more, label %body, label %done
body:
  %p = getelementptr i64, ptr %out, i64 %i
  store i64 %v, ptr %p, align 8
  %i1 = add i64 %i, 1
  br label %loop
done:
  ret i64 %b
}
"""
_MARK_T = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_float)


@pytest.fixture(scope="module")
def mark():
    obj = jit.compile_ir(_MARK_IR, cpu="x86-64", features="", opt=1, name="mark").obj
    return _MARK_T(jit.load(obj, ["dfpgen_test_mark"])["dfpgen_test_mark"])


def test_pytorchs_openmp_runtime_is_attached():
    assert openmp.attached_path() and "omp" in os.path.basename(openmp.attached_path())
    assert openmp.active()


@pytest.mark.parametrize("threading", ["openmp", "python"])
@pytest.mark.parametrize("total, threads", [(1, 2), (7, 2), (100, 3), (5, 5), (9, 4)])
def test_each_range_is_the_split_range(mark, monkeypatch, threading, total, threads):
    monkeypatch.setenv("DFPGEN_THREADING", threading)
    out = np.full(total, -1, np.int64)
    n = min(threads, total)
    counters = np.zeros((n, 3), np.int64)  # one row (24 bytes) per range
    got = parallel_call(mark, (out.ctypes.data, 7, counters.ctypes.data, 20.0, 3.0), 1, total,
                        threads, per_thread=(4, counters.strides[0]), results=True)
    ranges = split(total, n)
    want = np.concatenate([np.full(e - b, b * 1000 + 7) for b, e in ranges])
    assert np.array_equal(out, want)
    assert sorted(got) == [b for b, _ in ranges]
    # each range's counter row got its length plus the float and double arguments
    assert sorted(counters[:, 0].tolist()) == sorted(e - b + 23 for b, e in ranges)
    assert not counters[:, 1:].any()


def _passes(threads, mode):
    shape = (3, 10, 7, 13, 72, 3, 3, 1, 1, 1)
    n, c, h, w, k, r, s, u, p, d = shape
    xq, wq, dyq = operands(shape, seed=4, adversarial=mode == "fast")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dfpgen.OverflowWarning)
        y, yi = conv.conv2d(xq, wq, None, u, p, d, overflow=mode, threads=threads, return_info=True)
        dx, di = conv.conv2d_input((n, c, h, w), wq, dyq, u, p, d, overflow=mode, threads=threads,
                                   return_info=True)
        dw, wi = conv.conv2d_weight(xq, (k, c, r, s), dyq, u, p, d, overflow=mode, threads=threads,
                                    return_info=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 9, 6, 5), dtype=np.float32)
    q = pack.quantize_pack(x, DFP16, seed=3, threads=threads)
    act = rng.standard_normal((300, 24), dtype=np.float32)
    st = bn.batch_stats(act, threads=threads)
    return (y, dx, dw, q.mantissa, np.float64(q.exponent), st.sum, st.sumsq,
            np.array([yi.saturated, di.saturated, wi.saturated]))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_openmp_team_gives_the_python_pools_bits(monkeypatch, mode):
    monkeypatch.setenv("DFPGEN_THREADING", "python")
    ref = _passes(2, mode)
    monkeypatch.setenv("DFPGEN_THREADING", "openmp")
    got = _passes(2, mode)
    one = _passes(1, mode)
    for a, b, c in zip(ref, got, one):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert (ref[-1][:2] > 0).all() == (mode == "fast")


def test_a_forked_child_uses_the_python_pool():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: libgomp's team did not survive the fork
        os.write(w, b"1" if not openmp.active() else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


def test_a_bad_threading_variable_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("DFPGEN_THREADING", "tbb")
    with pytest.raises(dfpgen.DfpError, match=r"^\$DFPGEN_THREADING must be one of openmp, python, got 'tbb'$"):
        dfpgen.runtime.check_environment()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_bad_threading_variable_stops_the_numpy_api_too(monkeypatch, threads):
    # not only the runtime's layers: a kernel call on one thread or several refuses it
    import numpy as np
    x = np.ones((1, 4, 6, 6), np.float32)
    w = np.ones((4, 4, 3, 3), np.float32)
    monkeypatch.setenv("DFPGEN_THREADING", "bogus")
    with pytest.raises(dfpgen.DfpError, match=r"^\$DFPGEN_THREADING must be one of openmp, python, got 'bogus'$"):
        dfpgen.conv2d(x, w, padding=1, threads=threads)
    monkeypatch.setenv("DFPGEN_THREADING", "python")
    assert dfpgen.conv2d(x, w, padding=1, threads=threads).shape == (1, 4, 6, 6)


def test_two_python_threads_run_kernels_on_their_own_teams_at_once(mark):
    # each calling thread gets its own OpenMP team: concurrent launches neither mix their
    # ranges nor lose any
    import threading
    outs = [np.full(1000, -1, np.int64) for _ in range(4)]
    errors = []

    def work(i):
        try:
            for _ in range(50):
                counters = np.zeros((2, 3), np.int64)
                parallel_call(mark, (outs[i].ctypes.data, i, counters.ctypes.data, 0.0, 0.0), 1,
                              1000, 2, per_thread=(4, counters.strides[0]))
                assert sorted(counters[:, 0].tolist()) == [500, 500]
        except AssertionError as exc:
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for i, out in enumerate(outs):
        assert np.array_equal(out, np.repeat([0 * 1000 + i, 500 * 1000 + i], 500))


_NEG_IR = """
define i32 @dfpgen_test_neg(i64 %b, i64 %e, float %f) {
  %isinf = fcmp oeq float %f, 0x7FF0000000000000
  %b32 = trunc i64 %b to i32
  %neg = sub i32 -1, %b32
  %r = select i1 %isinf, i32 %neg, i32 7
  ret i32 %r
}
"""


@pytest.mark.parametrize("threading", ["openmp", "python"])
def test_signed_returns_and_out_of_range_floats_marshal_as_ctypes_does(monkeypatch, threading):
    monkeypatch.setenv("DFPGEN_THREADING", threading)
    proto = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_float)
    obj = jit.compile_ir(_NEG_IR, cpu="x86-64", features="", opt=1, name="neg").obj
    neg = proto(jit.load(obj, ["dfpgen_test_neg"])["dfpgen_test_neg"])
    got = parallel_call(neg, (1e39,), 0, 10, 3, results=True)  # 1e39 -> +inf in float32
    assert got == [-1 - b for b, _ in split(10, 3)]


def test_a_wrong_argument_list_is_refused_not_zero_filled(mark, monkeypatch):
    monkeypatch.setenv("DFPGEN_THREADING", "openmp")
    out = np.zeros(4, np.int64)
    with pytest.raises(dfpgen.DfpError, match="kernel takes 7 arguments, got 5"):
        parallel_call(mark, (out.ctypes.data, 7, 0.0), 1, 4, 2)
    with pytest.raises(dfpgen.DfpError, match="per-thread argument 3 is not a pointer"):
        parallel_call(mark, (out.ctypes.data, 7, out.ctypes.data, 0.0, 0.0), 1, 4, 2,
                      per_thread=(3, 8))


def test_a_forked_child_of_a_python_pool_parent_gets_a_pool_of_its_own(mark, monkeypatch):
    # the parent's pool threads do not exist in the child: reusing that pool would hang
    import time
    monkeypatch.setenv("DFPGEN_THREADING", "python")
    out = np.zeros(8, np.int64)
    counters = np.zeros((2, 3), np.int64)
    args = (out.ctypes.data, 1, counters.ctypes.data, 0.0, 0.0)
    parallel_call(mark, args, 1, 8, 2, per_thread=(4, 24))  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:
        try:
            parallel_call(mark, args, 1, 8, 2, per_thread=(4, 24))
            os._exit(0)
        except BaseException:
            os._exit(1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on its parent's thread pool")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
