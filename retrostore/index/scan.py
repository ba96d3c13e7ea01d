"""One query's exact scores against many vectors, without waiting on a busy core.

A single query's exact scan of a Flat segment was one numpy matrix-vector product, and numpy's
OpenBLAS cuts it over every core and waits for all of them: on this 2-core machine with other
work on it, the product over 51,429 vectors of 384-d took 8.0-8.5 ms against 2.3-2.6 ms on one
thread (quiet: 1.3 against 2.5 ms; ``benchmarks/scan.py``). Issue 17: single queries must not pay
for threads that wait on busy cores.

:func:`inner_products` cuts the rows into pieces of :data:`PIECE_ROWS`. This thread takes pieces
from the front and one thread of the process's call pool takes them from the back, each with
FAISS's single-threaded SIMD kernel (``fvec_inner_products_ny``, which releases the GIL). This
thread waits for the other at most one piece's time: when it runs out of pieces, a piece the pool
thread holds but has not finished by then is computed again here, and the pool thread's copy is
dropped. A free core makes the scan about as fast as the product on 2 threads; a busy one costs
about one thread's time and a piece.
"""

from __future__ import annotations

import threading
import time

import faiss
import numpy as np

from ..threads import call_pool, cpu_count, in_call_pool

__all__ = ["inner_products", "PIECE_ROWS", "SPLIT_MIN_ROWS"]

#: Rows per piece: 8,192 rows of 384-d float32 are 12 MiB, ~0.4 ms on one core (what a stalled
#: pool thread can cost: one piece's wait, one piece computed again).
PIECE_ROWS = 8192
#: Fewer rows are scanned on this thread alone (handing work over costs ~20-50 us).
SPLIT_MIN_ROWS = 16384

_FREE, _POOL, _DONE = 0, 1, 2


def _kernel(out: np.ndarray, q: np.ndarray, xb: np.ndarray) -> None:
    faiss.fvec_inner_products_ny(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(xb), xb.shape[1], len(xb))


def inner_products(xb: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``xb @ q``, computed as described in the module's docstring.

    Parameters
    ----------
    xb : ndarray, shape (n, d), float32, C-contiguous
        The vectors (e.g. a Flat segment's, viewed with ``faiss.rev_swig_ptr``).
    q : ndarray, shape (d,), float32
        The query.

    Returns
    -------
    ndarray, shape (n,), float32
        Inner products, equal to FAISS's single-threaded kernel's whichever thread computed them.
    """
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32)
    n = len(xb)
    out = np.empty(n, np.float32)
    if n < SPLIT_MIN_ROWS or cpu_count() < 2 or in_call_pool():
        _kernel(out, q, xb)
        return out
    pieces = [(lo, min(n, lo + PIECE_ROWS)) for lo in range(0, n, PIECE_ROWS)]
    state = [_FREE] * len(pieces)
    done = threading.Condition()

    def pool_share() -> None:  # from the back; its result is kept only if this thread did not take over
        for i in range(len(pieces) - 1, -1, -1):
            with done:
                if state[i] != _FREE:
                    return  # the two threads met
                state[i] = _POOL
            lo, hi = pieces[i]
            part = np.empty(hi - lo, np.float32)
            _kernel(part, q, xb[lo:hi])
            with done:
                if state[i] != _POOL:
                    return  # taken over
                out[lo:hi] = part
                state[i] = _DONE
                done.notify()

    try:
        call_pool().submit(pool_share)
    except RuntimeError:  # the pool is shut down (interpreter exit): this thread does it all
        pass
    took = 0.0
    for i, (lo, hi) in enumerate(pieces):
        with done:
            if state[i] != _FREE:
                break  # the pool thread's share starts here
            state[i] = _DONE
        t0 = time.perf_counter()
        _kernel(out[lo:hi], q, xb[lo:hi])
        took = max(took, time.perf_counter() - t0)
    for i, (lo, hi) in enumerate(pieces):
        with done:
            # A piece the pool thread is on: give it the time this thread took for one piece, then
            # compute it here (the pool thread's copy is dropped).
            done.wait_for(lambda: state[i] != _POOL, timeout=took or 1e-3)
            if state[i] == _DONE:
                continue
            state[i] = _DONE
        _kernel(out[lo:hi], q, xb[lo:hi])
    return out
