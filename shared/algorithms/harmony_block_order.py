"""The order in which harmonypy updates cells: ``std::mt19937`` and libstdc++'s
``std::shuffle`` reproduced bit for bit, and harmonypy's block boundaries."""

from __future__ import annotations

import math

import numpy as np

_U32 = 1 << 32
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


class StdMt19937:
    """``std::mt19937`` with the draws libstdc++ (GCC >= 11) makes from it.

    The generator is NumPy's MT19937 set to the state ``std::mt19937(seed)`` starts
    in (reference ``init_genrand`` seeding, which ``RandomState(seed)`` uses too).

    Parameters
    ----------
    seed : int, default 0
        Seed, reduced modulo 2**32 as ``std::mt19937`` does.
    """

    _CHUNK = 1 << 16
    # Draws examined at once by bounded(): small, since a rejection restarts the
    # vectorized step (rejections are frequent when ranges approach 2**32).
    _BOUNDED_CHUNK = 1 << 11

    def __init__(self, seed: int = 0) -> None:
        seeded = np.random.RandomState(int(seed) % _U32).get_state(legacy=False)
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": seeded["state"]}
        self._buffer = np.empty(0, dtype=np.uint64)
        self._pos = 0

    def _peek(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs (as uint64) without consuming them."""
        if self._pos + n > self._buffer.size:
            rest = self._buffer[self._pos :]
            fresh = self._bits.random_raw(max(n, self._CHUNK))
            self._buffer = np.concatenate([rest, fresh])
            self._pos = 0
        return self._buffer[self._pos : self._pos + n]

    def outputs(self, n: int) -> np.ndarray:
        """Consume and return the next ``n`` outputs, uint64 holding 32-bit values."""
        out = self._peek(n).copy()
        self._pos += n
        return out

    def discard(self, n: int) -> None:
        """Skip ``n`` outputs (``std::mt19937::discard``), in bounded memory."""
        while n > 0:
            step = min(n, self._CHUNK)
            self._peek(step)
            self._pos += step
            n -= step

    def bounded(self, ranges: np.ndarray) -> np.ndarray:
        """One draw in ``[0, r)`` per entry ``r`` of ``ranges``, in order.

        libstdc++'s ``uniform_int_distribution`` for a 32-bit generator: Lemire's
        multiply-shift with rejection of the biased low words.

        Parameters
        ----------
        ranges : np.ndarray
            Range sizes, each in ``[1, 2**32]``.

        Returns
        -------
        np.ndarray
            int64 draws, same length as ``ranges``.
        """
        ranges = np.asarray(ranges, dtype=np.uint64)
        out = np.empty(ranges.size, dtype=np.int64)
        start = 0
        while start < ranges.size:
            r = ranges[start : start + self._BOUNDED_CHUNK]
            product = self._peek(r.size) * r
            threshold = (np.uint64(_U32) - r) % r
            rejected = np.flatnonzero((product & _LOW32) < threshold)
            n_ok = r.size if rejected.size == 0 else int(rejected[0])
            out[start : start + n_ok] = (product[:n_ok] >> _SHIFT32).astype(np.int64)
            self._pos += n_ok
            start += n_ok
            if rejected.size:
                # The biased draw is rejected: redraw this one alone, then resume.
                out[start] = self._bounded_one(int(ranges[start]))
                start += 1
        return out

    def _bounded_one(self, r: int) -> int:
        threshold = (_U32 - r) % r
        while True:
            product = int(self.outputs(1)[0]) * r
            if product & 0xFFFFFFFF >= threshold:
                return product >> 32


def std_shuffle(rng: StdMt19937, n: int) -> np.ndarray:
    """``std::shuffle`` of ``0..n-1`` as libstdc++ does it with a 32-bit generator.

    When ``n * n`` fits the generator's range, libstdc++ draws one number per two
    elements and splits it into two swap positions; otherwise one per element.

    Parameters
    ----------
    rng : StdMt19937
        The generator (advanced in place).
    n : int
        Number of elements.

    Returns
    -------
    np.ndarray
        int64 permutation.
    """
    order = list(range(n))
    if n < 2:
        return np.asarray(order, dtype=np.int64)
    if (_U32 - 1) // n >= n:
        first = 1
        if n % 2 == 0:
            j = int(rng.bounded(np.array([2]))[0])
            order[1], order[j] = order[j], order[1]
            first = 2
        i = np.arange(first, n, 2, dtype=np.int64)
        draws = rng.bounded((i + 1) * (i + 2))
        for a, x in zip(i.tolist(), draws.tolist(), strict=True):
            p, q = divmod(x, a + 2)
            order[a], order[p] = order[p], order[a]
            order[a + 1], order[q] = order[q], order[a + 1]
    else:
        draws = rng.bounded(np.arange(2, n + 1, dtype=np.int64))
        for a, p in enumerate(draws.tolist(), start=1):
            order[a], order[p] = order[p], order[a]
    return np.asarray(order, dtype=np.int64)


def block_bounds(n_cells: int, block_size: float) -> np.ndarray:
    """Start of each block of a k-means pass, then ``n_cells`` (harmonypy's blocks).

    ``ceil(1 / block_size)`` blocks of ``floor(N * block_size)`` cells (at least 1,
    the product in float32 as in harmonypy); the last block takes the rest and
    blocks past the end are dropped.

    Parameters
    ----------
    n_cells : int
        Pooled number of cells N.
    block_size : float
        Fraction of cells per block.

    Returns
    -------
    np.ndarray
        int64, ``n_blocks + 1`` increasing offsets.
    """
    bs = np.float32(block_size)
    n_blocks = math.ceil(1.0 / float(bs))
    per_block = max(1, int(np.float32(n_cells) * bs))
    starts = [i * per_block for i in range(n_blocks) if i * per_block < n_cells]
    return np.asarray([*starts, n_cells], dtype=np.int64)
