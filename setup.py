# The commP kernel is the one native hot loop; everything else is pure Python.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "packerfs.piece._commp",
            sources=["packerfs/piece/_commp.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"],
            extra_link_args=["-lpthread"],
        )
    ]
)
