# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled loop of `treewalk`: every tree's leaf for every row, from leaf masks.

Compiled when the package is installed (setup.py), so scoring needs no compiler and no
JIT: importing it costs nothing measurable, in time or memory.
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc

# Rows per block: the block's columns of bins and its leaf masks stay in the first-level
# cache while every tree is walked over them.
cdef enum:
    BLOCK = 512

# De Bruijn constant for 64-bit words: for a word with one bit set, the top six bits of
# the product are distinct for each of the 64 positions (`treewalk.DE_BRUIJN_SLOT`).
DE_BRUIJN = 0x03F79D71B4CB0A89


def add_trees(
    const uint8_t[:, ::1] bins,
    const int64_t[::1] offsets,
    const int64_t[::1] features,
    const uint64_t[:, ::1] masks,
    const double[:, ::1] values,
    double[::1] raw,
):
    """Add each tree's leaf value to `raw`, tree after tree, as scikit-learn sums them.

    bins: (rows, columns). Tree t owns mask rows offsets[t]:offsets[t+1]; mask row s
    belongs to bin column features[s] and holds, per bin value, the leaves still
    possible. values[t] is tree t's leaf values, indexed by the De Bruijn slot of the
    leaf's bit. Runs without the GIL.
    """
    cdef Py_ssize_t rows = bins.shape[0], columns = bins.shape[1]
    cdef Py_ssize_t trees = offsets.shape[0] - 1
    cdef Py_ssize_t start, width, i, column, tree, s
    cdef uint64_t bit, de_bruijn = DE_BRUIJN
    cdef const uint8_t* column_bins
    cdef const uint64_t* mask
    if trees < 0:
        raise ValueError("add_trees: offsets needs a first 0")
    if raw.shape[0] != rows or values.shape[0] != trees or values.shape[1] != 64:
        raise ValueError("add_trees: bins, values and raw do not agree")
    if masks.shape[0] and masks.shape[1] != 256:
        raise ValueError("add_trees: a mask row needs one mask per bin value")
    if features.shape[0] != masks.shape[0] or offsets[0] != 0 or offsets[trees] != masks.shape[0]:
        raise ValueError("add_trees: offsets, features and masks do not agree")
    for tree in range(trees):
        if offsets[tree] > offsets[tree + 1]:
            raise ValueError("add_trees: offsets must not decrease")
    for s in range(features.shape[0]):
        if not 0 <= features[s] < columns:
            raise ValueError("add_trees: a mask row's bin column is out of range")
    # Laid out column by column, so a mask row's lookups read consecutive bytes (+ 1:
    # no malloc(0), which may give NULL, for a model without columns).
    cdef uint8_t* block = <uint8_t*> malloc(columns * BLOCK * sizeof(uint8_t) + 1)
    cdef uint64_t* left = <uint64_t*> malloc(BLOCK * sizeof(uint64_t))
    if block == NULL or left == NULL:
        free(block)
        free(left)
        raise MemoryError()
    try:
        with nogil:
            start = 0
            while start < rows:
                width = min(<Py_ssize_t> BLOCK, rows - start)
                for i in range(width):
                    for column in range(columns):
                        block[column * BLOCK + i] = bins[start + i, column]
                for tree in range(trees):
                    for i in range(width):
                        left[i] = <uint64_t> 0xFFFFFFFFFFFFFFFF
                    for s in range(offsets[tree], offsets[tree + 1]):
                        column_bins = block + features[s] * BLOCK
                        mask = &masks[s, 0]
                        for i in range(width):
                            left[i] &= mask[column_bins[i]]
                    for i in range(width):
                        # The leftmost leaf still possible is the one reached: its bit
                        # alone, then its slot.
                        bit = left[i] & (~left[i] + 1)
                        raw[start + i] += values[tree, (bit * de_bruijn) >> 58]
                start += BLOCK
    finally:
        free(block)
        free(left)
