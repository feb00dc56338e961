"""Build hook for the emulator's C kernel; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "opentsu._kernel",
            sources=["software/_kernel.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-fno-strict-aliasing"],
        )
    ]
)
