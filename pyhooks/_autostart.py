"""Start-up hooks behind VMMALLOC=1 and VMMALLOC_HF_CACHE, armed by vmmalloc-autostart.pth
at interpreter start.

The .pth line imports this module only when one of the variables is set, so unset
variables cost two environment lookups. Here one-shot import hooks wait for `import torch`
(and enable vmmalloc as soon as torch has loaded, before any CUDA allocation can happen)
and for `import transformers` (and patch generate()). Child processes (python -m,
torchrun, accelerate launch) inherit the variables and arm themselves.
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


HF_CACHES = ("vmm", "offload")


def requested_hf_cache() -> str | None:
    """The cache VMMALLOC_HF_CACHE asks generate() to use; raises ValueError for an unknown one."""
    value = os.environ.get("VMMALLOC_HF_CACHE", "").strip().lower()
    if value in FALSE_VALUES:
        return None
    if value in HF_CACHES:
        return value
    raise ValueError(f"VMMALLOC_HF_CACHE={os.environ['VMMALLOC_HF_CACHE']!r} is not understood; "
                     f"allowed: {', '.join(HF_CACHES)}, or unset")


def requested_cache_options(cache: str | None) -> dict:
    """Options for `cache` from the environment: VMMALLOC_KV_BUDGET, the offload cache's GPU
    budget for KV, which it needs and no other cache takes. Raises ValueError otherwise."""
    text = os.environ.get("VMMALLOC_KV_BUDGET", "").strip()
    if cache != "offload":
        if text:
            raise ValueError(f"VMMALLOC_KV_BUDGET={text!r} is the budget of VMMALLOC_HF_CACHE=offload; "
                             f"VMMALLOC_HF_CACHE is {cache or 'unset'}")
        return {}
    if not text:
        raise ValueError("VMMALLOC_HF_CACHE=offload needs VMMALLOC_KV_BUDGET, the GPU memory for KV "
                         "(e.g. VMMALLOC_KV_BUDGET=8GiB)")
    from vmmalloc.sizes import parse_bytes

    return {"kv_budget": parse_bytes(text, "VMMALLOC_KV_BUDGET")}


def _enable() -> None:
    from vmmalloc import _C
    from vmmalloc.process_report import arm_from_env
    from vmmalloc.torch_allocator import enable_vmm_allocator

    reason = _C.cuda_library_reason()
    if reason:
        # A script that runs without vmmalloc must run with VMMALLOC=1 too, GPU or not.
        import warnings

        warnings.warn(f"VMMALLOC=1: vmmalloc is inactive in this process ({reason})",
                      RuntimeWarning, stacklevel=2)
        return
    enable_vmm_allocator()
    arm_from_env()


def _patch_generate(cache: str, options: dict) -> None:
    from vmmalloc.integrations.generate_patch import patch_generate

    if not requested():
        import warnings

        warnings.warn(f"VMMALLOC_HF_CACHE={cache} without VMMALLOC=1: KV pages come from a pool of their own, "
                      "beside PyTorch's allocator, and neither releases the other's cache when memory runs out; "
                      "set VMMALLOC=1 for one memory budget", RuntimeWarning, stacklevel=2)
    patch_generate(cache, **options)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds `module` through the other finders and runs `action` once it executed."""

    def __init__(self, module: str, action) -> None:
        self.module = module
        self.action = action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module
        action = self.action

        def exec_module(module):
            original(module)
            action()

        loader.exec_module = exec_module
        return spec


def _after_import(module: str, action) -> None:
    if module in sys.modules:
        action()
    elif not any(isinstance(f, _AfterImport) and f.module == module for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(module, action))


def arm() -> None:
    cache = requested_hf_cache()  # every variable is checked before anything is armed
    options = requested_cache_options(cache)
    if requested():
        _after_import("torch", _enable)
    if cache is not None:
        _after_import("transformers", lambda: _patch_generate(cache, options))


try:
    arm()
except ValueError as error:  # a .pth line cannot raise usefully: make the next torch import fail
    _message = str(error)

    class _Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname in ("torch", "transformers"):
                raise ImportError(f"vmmalloc: {_message}")
            return None

    sys.meta_path.insert(0, _Refuse())
