"""Build script for the one C extension; every other setting lives in setup.cfg."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension(
        "official_maskrcnn.evaluation._mask_rle",
        sources=["official_maskrcnn/evaluation/_mask_rle.c"],
        # Exact float32 rounding of every product and sum (the reference's bilinear resize):
        # no fused multiply-add contraction, whatever the compiler's default.
        extra_compile_args=["-O3", "-ffp-contract=off", "-std=c11", "-Wall", "-Wextra"],
    ),
])
