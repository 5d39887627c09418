"""Builds vmmalloc._C from allocator/ with pybind11.

The extension links neither libcuda nor torch: the CUDA driver is opened at run time
(allocator/cuda_driver.cpp), so the build needs only a C++17 compiler and Python headers.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

extension = Pybind11Extension(
    "vmmalloc._C",
    sorted(glob("allocator/*.cpp")),
    include_dirs=["allocator"],
    cxx_std=17,
    libraries=["dl"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
)

setup(ext_modules=[extension], cmdclass={"build_ext": build_ext})
