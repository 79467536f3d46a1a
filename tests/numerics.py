"""Tolerances that follow from float32 rounding, for tests that compare two computations.

Two paths to the same float32 quantity (TF vs a float64 numpy reference, XLA vs eager, one CPU
vs another) differ by rounding: each float32 operation is exact to half an ulp of its result,
and the kernels (oneDNN or Eigen, AVX2 or AVX-512, XLA's own exp / log) round differently. An
absolute tolerance of a few ulps of the largest magnitude involved is what such a comparison
can promise; a fixed number like 1e-5 is right only for values of one size.
"""

import numpy as np


def ulps(values, count):
    """`count` float32 ulps at the largest magnitude of `values` (a python float)."""
    return count * float(np.spacing(np.float32(np.max(np.abs(np.asarray(values, np.float64))))))


def sum_of_products_bound(absolute_sums, num_terms):
    """Elementwise bound on |float32 result - exact| of sums of `num_terms` products (a matrix
    product, a convolution): gamma_n = n u / (1 - n u) (u = 2^-24, Higham's bound for recursive
    or blocked summation) times each sum's sum of |products| (`absolute_sums`: the same
    computation in float64 on absolute values). Count a bias as one more term."""
    unit = 2.0**-24
    gamma = num_terms * unit / (1 - num_terms * unit)
    return gamma * np.asarray(absolute_sums, np.float64)
