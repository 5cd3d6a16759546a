"""Builds the C fast path of the entropy coder (the numpy reference needs no compiler)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ctxstream.codec._ransc",
            sources=["ctxstream/codec/_ransc.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ]
)
