"""VMMALLOC_CONF parsing, and importing vmmalloc on a machine without CUDA."""
from __future__ import annotations

import subprocess
import sys

import pytest

import vmmalloc


def test_empty_and_full_configs_parse():
    assert vmmalloc.parse_config("")["stitching"] is True
    conf = vmmalloc.parse_config(
        " memory_cap:1.5GiB, stitching:false,max_cached_mappings:16,max_mapped_bytes:64GB,reuse_ratio:1.5 ")
    assert conf["memory_cap"] == 3 * (1 << 29)
    assert conf["stitching"] is False
    assert conf["max_cached_mappings"] == 16
    assert conf["max_mapped_bytes"] == 64 * 10**9
    assert conf["reuse_ratio"] == 1.5


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("colour:blue", ["unknown key 'colour'", "memory_cap", "stitching"]),
        ("memory_cap:lots", ["'memory_cap'", "8GiB"]),
        ("memory_fraction:1.5", ["'memory_fraction'", "(0, 1]"]),
        ("stitching:maybe", ["'stitching'", "true or false"]),
        ("max_cached_mappings:0", ["'max_cached_mappings'", ">= 1"]),
        ("reuse_ratio:0.5", ["'reuse_ratio'", ">= 1"]),
        ("growth_slack:2", ["'growth_slack'", "[0, 1]"]),
        ("memory_cap", ["not key:value"]),
        ("stitching:true,stitching:false", ["given twice"]),
        ("memory_cap:1GiB,memory_fraction:0.5", ["not both"]),
    ],
)
def test_bad_configs_name_the_key_and_the_allowed_values(text, fragments):
    with pytest.raises(ValueError) as caught:
        vmmalloc.parse_config(text)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_allocator_rejects_a_bad_config():
    with pytest.raises(ValueError, match="unknown key"):
        vmmalloc.Allocator(vmmalloc.HostBackend(1 << 24), "nope:1")


def test_memory_fraction_config_sets_the_cap():
    alloc = vmmalloc.Allocator(vmmalloc.HostBackend(64 << 20), "memory_fraction:0.25")
    assert alloc.memory_cap == 16 << 20


def test_make_backend_names():
    assert vmmalloc.make_backend("host", capacity=1 << 22).name == "host"
    with pytest.raises(ValueError, match="allowed: host, cuda"):
        vmmalloc.make_backend("tpu")


def test_import_works_without_cuda_and_says_why_cuda_is_unavailable():
    # A fresh interpreter: importing must not touch the GPU or need libcuda.
    code = "import vmmalloc; print(vmmalloc.cuda_available()); print(vmmalloc.cuda_unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    available, reason = out.splitlines()[0], "\n".join(out.splitlines()[1:])
    if available == "True":
        assert reason == ""
    else:
        assert reason.startswith("CUDA is unavailable")
        with pytest.raises(vmmalloc.BackendError, match="CUDA is unavailable"):
            vmmalloc.CudaBackend(0)


def test_extension_does_not_link_libcuda_or_torch():
    import vmmalloc._C as ext

    with open(ext.__file__, "rb") as f:
        assert b"libcuda.so.1" in f.read()  # opened at run time, by name
    dynamic = subprocess.run(["readelf", "-d", ext.__file__], capture_output=True, text=True, check=True)
    needed = [line for line in dynamic.stdout.splitlines() if "NEEDED" in line]
    assert needed, "readelf listed no dependencies at all"
    for lib in ("libcuda", "libcudart", "libtorch", "libc10"):
        assert not any(lib in line for line in needed), needed


def test_type_stubs_cover_exactly_the_extension():
    import ast
    from pathlib import Path

    import vmmalloc._C as ext

    stub = Path(vmmalloc.__file__).with_name("_C.pyi")
    tree = ast.parse(stub.read_text())
    def names(body: list[ast.stmt]) -> set[str]:
        found = {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        found |= {n.target.id for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        return {name for name in found if not name.startswith("_")}

    stubbed = names(tree.body)
    public = {name for name in dir(ext) if not name.startswith("_")}
    assert stubbed == public, f"stub only: {stubbed - public}; module only: {public - stubbed}"
    # the testing submodule, stubbed as the class _Testing
    testing = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Testing")
    in_submodule = {name for name in dir(ext.testing) if not name.startswith("_")}
    assert names(testing.body) == in_submodule, (names(testing.body), in_submodule)


def test_byte_counts_follow_one_rule_everywhere(monkeypatch):
    """VMMALLOC_CONF, the Python options and the environment variables read byte counts the
    same way (allocator/core/config.hpp, kByteCountRule)."""
    from vmmalloc import _autostart, virtual_tensor
    from vmmalloc.sizes import parse_bytes

    for text, expected in (("8G", 8 << 30), ("8GiB", 8 << 30), ("1e9", 10**9), ("1.5GB", 1_500_000_000),
                           ("512 mib", 512 << 20), ("4096", 4096)):
        assert parse_bytes(text) == expected
        assert vmmalloc.parse_config(f"memory_cap:{text}")["memory_cap"] == expected
    for bad in ("8 gigs", "-1", "0x10", "1e", "inf", ""):
        with pytest.raises(ValueError, match="cannot read"):
            parse_bytes(bad)
        with pytest.raises(ValueError, match="VMMALLOC_CONF key 'memory_cap'"):
            vmmalloc.parse_config(f"memory_cap:{bad}x")
    monkeypatch.setenv("VMMALLOC_HF_CACHE", "offload")
    monkeypatch.setenv("VMMALLOC_KV_BUDGET", "1e9")
    assert _autostart.requested_cache_options("offload") == {"kv_budget": 10**9}
    monkeypatch.setenv("VMMALLOC_KV_BUDGET", "lots")
    with pytest.raises(ValueError, match="VMMALLOC_KV_BUDGET: cannot read 'lots'"):
        _autostart.requested_cache_options("offload")
    monkeypatch.setattr(virtual_tensor, "_host_allocator", None)
    monkeypatch.setenv("VMMALLOC_HOST_CAPACITY", "lots")
    with pytest.raises(ValueError, match="VMMALLOC_HOST_CAPACITY: cannot read 'lots'"):
        virtual_tensor.host_allocator()
    monkeypatch.setenv("VMMALLOC_HOST_CAPACITY", "64MiB")
    assert virtual_tensor.host_allocator().stats()["vmm.memory_cap"] == 64 << 20


def test_one_table_drives_parsing_errors_the_dict_and_the_python_options():
    from vmmalloc import _C, torch_allocator

    table = _C.config_key_table()
    names = [name for name, _, _ in table]
    assert list(_C.parse_config("")) == names, "to_dict lists the table's keys"
    assert torch_allocator.OPTION_KEYS == tuple(names)
    with pytest.raises(ValueError) as unknown:
        _C.parse_config("no_such_key:1")
    assert str(unknown.value).endswith("allowed keys: " + ", ".join(names)), "errors list the table's keys"
    for name, allowed, default in table:
        assert _C.parse_config("")[name] == default
        assert f"``{name}``: {allowed}" in vmmalloc.enable_vmm_allocator.__doc__
        with pytest.raises(ValueError, match=f"'{name}'"):
            _C.parse_config(f"{name}:not-a-value")
