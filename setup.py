"""Build hook for the one optional C extension; everything else is in pyproject.toml.

fedhpc.aggregator._kernels fuses the aggregator's accumulate and square-sum passes. It is
optional: where no C compiler is available the package installs without it and the
aggregator uses its torch path (same results to rounding, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fedhpc.aggregator._kernels",
            sources=["services/fedhpc/aggregator/_kernels.c"],
            # Python's own CFLAGS carry -fwrapv, which stops GCC vectorizing these loops.
            extra_compile_args=["-O3", "-fno-wrapv"],
            optional=True,
        )
    ]
)
