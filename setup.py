"""Builds vmmalloc._C from allocator/ with pybind11.

The extension links neither libcuda nor torch: the CUDA driver is opened at run time
(allocator/backend/cuda_driver.cpp), so the build needs only a C++17 compiler and Python headers.
The torch adapter (allocator/torch_adapter/) is not built here: it is compiled against the
running torch on first use (pyhooks/torch_adapter.py).
"""
from glob import glob
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

# VMMALLOC=1 and VMMALLOC_HF_CACHE support: a .pth line run at every interpreter start. It
# costs two environment lookups when both are unset and imports vmmalloc._autostart otherwise.
AUTOSTART_PTH = "vmmalloc-autostart.pth"
AUTOSTART_LINE = (
    "import os; (os.environ.get('VMMALLOC', '').strip() or os.environ.get('VMMALLOC_HF_CACHE', '').strip())"
    " and __import__('vmmalloc._autostart')\n"
)


# The torch adapter is compiled on first use against the running torch
# (vmmalloc.torch_adapter), so a wheel carries its sources as vmmalloc/torch_adapter/.
ADAPTER_SOURCES = sorted(glob("allocator/torch_adapter/*.cpp") + glob("allocator/torch_adapter/*.h"))


class build_py_with_pth(build_py):
    """Puts the start-up .pth file at the root of the wheel (site-packages), and the torch
    adapter's sources into the package."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / AUTOSTART_PTH
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(AUTOSTART_LINE)
        for source in self._adapter_targets():
            source[1].parent.mkdir(parents=True, exist_ok=True)
            source[1].write_bytes(Path(source[0]).read_bytes())

    def _adapter_targets(self):
        return [(s, Path(self.build_lib) / "vmmalloc" / "torch_adapter" / Path(s).name) for s in ADAPTER_SOURCES]

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / AUTOSTART_PTH),
                *(str(target) for _, target in self._adapter_targets())]

extension = Pybind11Extension(
    "vmmalloc._C",
    sorted(glob("allocator/backend/*.cpp") + glob("allocator/core/*.cpp") + glob("allocator/abi/*.cpp")),
    include_dirs=["allocator"],
    cxx_std=17,
    libraries=["dl"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
)

class _AutostartStrategy:
    """Wraps setuptools' editable strategy so that editable wheels carry the .pth too."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.inner.__exit__(*exc_info)

    def __call__(self, wheel, files, mapping):
        result = self.inner(wheel, files, mapping)
        wheel.writestr(AUTOSTART_PTH, AUTOSTART_LINE)
        return result


cmdclass = {"build_ext": build_ext, "build_py": build_py_with_pth}
try:  # PEP 660 editable installs (setuptools >= 64) build their own wheel
    from setuptools.command.editable_wheel import editable_wheel

    class editable_wheel_with_pth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _AutostartStrategy(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = editable_wheel_with_pth
except ImportError:
    pass

setup(ext_modules=[extension], cmdclass=cmdclass)
