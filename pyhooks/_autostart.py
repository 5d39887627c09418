"""Start-up hook behind VMMALLOC=1, armed by vmmalloc-autostart.pth at interpreter start.

The .pth line imports this module only when VMMALLOC is set, so an unset variable costs
one environment lookup. Here a one-shot import hook waits for `import torch` and enables
vmmalloc as soon as torch has loaded, before any CUDA allocation can happen. Child
processes (python -m, torchrun, accelerate launch) inherit the variable and arm themselves.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TRUE_VALUES = ("1", "true", "on", "yes")
FALSE_VALUES = ("", "0", "false", "off", "no")


def requested() -> bool:
    """Whether VMMALLOC asks for the allocator; raises ValueError for an unknown value."""
    value = os.environ.get("VMMALLOC", "").strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(f"VMMALLOC={os.environ['VMMALLOC']!r} is not understood; "
                     f"allowed: {', '.join(TRUE_VALUES)} to enable, {', '.join(v or repr(v) for v in FALSE_VALUES)} to disable")


def _enable() -> None:
    from vmmalloc.torch_allocator import enable_vmm_allocator

    enable_vmm_allocator()


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Finds torch through the other finders and runs _enable once its module executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _enable()

        loader.exec_module = exec_module
        return spec


def arm() -> None:
    if not requested():
        return
    if "torch" in sys.modules:
        _enable()
    elif not any(isinstance(f, _AfterTorchImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorchImport())


try:
    arm()
except ValueError as error:  # a .pth line cannot raise usefully: make the next torch import fail
    _message = str(error)

    class _Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torch":
                raise ImportError(f"vmmalloc: {_message}")
            return None

    sys.meta_path.insert(0, _Refuse())
