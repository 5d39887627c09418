"""The repository stands alone: every Note a comment points to is defined exactly once, and
every citation of the measured facts resolves to the file in the repository."""
from __future__ import annotations

import collections
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".py", ".cpp", ".hpp", ".h", ".md", ".sh", ".toml"}
# A Note is defined by a line holding its name alone (PyTorch's style), after an optional
# comment marker; every other mention is a reference.
DEFINITION = re.compile(r"^\s*(?://|#)?\s*Note \[([^\]]+)\]\s*$")
MENTION = re.compile(r"Note \[([^\]]+)\]")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    return [ROOT / n for n in names
            if (Path(n).suffix in SUFFIXES or n.startswith(".ci/")) and (ROOT / n).is_file()]


def test_every_note_reference_has_exactly_one_definition():
    definitions: dict[str, list[str]] = collections.defaultdict(list)
    references: dict[str, list[str]] = collections.defaultdict(list)
    for path in tracked_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            match = DEFINITION.match(line)
            if match:
                definitions[match.group(1)].append(where)
                continue
            for name in MENTION.findall(line):
                references[name].append(where)
    twice = {name: places for name, places in definitions.items() if len(places) > 1}
    assert not twice, f"Notes defined more than once: {twice}"
    # PyTorch's own Notes are cited by name with the file they live in.
    external = {"Interaction with CUDA graph capture"}
    missing = {name: places[:3] for name, places in references.items() if name not in definitions and name not in external}
    assert not missing, f"Notes referred to but defined nowhere: {missing}"


def test_cited_facts_resolve_in_the_repository():
    facts = ROOT / "docs" / "FACTS.md"
    assert facts.is_file()
    bare = []
    for path in tracked_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in re.finditer(r"(\S*)FACTS\.md", line):
                if path in (facts, Path(__file__).resolve()):
                    continue
                if not match.group(0).lstrip("(`'\"").startswith("docs/FACTS.md"):
                    bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert not bare, "cite docs/FACTS.md, the copy in the repository:\n" + "\n".join(bare)


# The floors of allocator/, bottom up, and what each may include of the project's headers.
FLOORS = {
    "backend": ("backend/",),                      # the driver and the host's primitives
    "core": ("core/", "backend/backend.hpp"),      # the allocator, over Backend's interface only
    "abi": ("backend/", "core/", "abi/", "torch_adapter/adapter_abi.h"),  # bindings, C tables, the registry
    "torch_adapter": ("adapter_abi.h", "trace_recorder.h", "ipc_handles.h"),  # torch-linked; reaches the core through the C table
}


def test_each_floor_includes_only_what_is_below_it():
    wrong = []
    for floor, allowed in FLOORS.items():
        for path in sorted((ROOT / "allocator" / floor).iterdir()):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                match = re.match(r'\s*#include "([^"]+)"', line)
                if match and not match.group(1).startswith(allowed):
                    wrong.append(f"allocator/{floor}/{path.name}:{number} includes {match.group(1)}")
    assert not wrong, "\n".join(wrong)
    assert sorted(p.name for p in (ROOT / "allocator").iterdir()) == sorted(FLOORS), "every file in a floor"
