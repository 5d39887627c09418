"""The vmmalloc command: arguments, the report from stored results, the demo and `run`."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vmmalloc
from vmmalloc import cli

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def vmmalloc_cmd(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VMMALLOC")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "vmmalloc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full_env)


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["bench"], ["report"]])
def test_every_command_has_help(command):
    proc = vmmalloc_cmd(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("args, message", [
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["demo", "--backend", "tpu"], "invalid choice: 'tpu'"),
    (["run"], "give the command to run after --"),
    (["run", "--kv-budget", "8GiB", "--", "true"], "--kv-budget is the offload cache's budget"),
    (["run", "--hf-cache", "offload", "--", "true"], "--hf-cache offload needs --kv-budget"),
    (["run", "--history", "-1", "--", "true"], "--history must be >= 0"),
    (["run", "--conf", "memory_cap:lots", "--", "true"], "memory_cap"),
    (["run", "--", "no-such-program-here"], "command not found: no-such-program-here"),
    (["bench", "nonsense"], "unknown benchmark(s) nonsense"),
])
def test_bad_arguments_are_clear_errors(args, message):
    proc = vmmalloc_cmd(*args)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.skipif(vmmalloc.cuda_available(), reason="checks the message given on a machine without a GPU")
def test_asking_for_the_gpu_without_one_says_what_to_do():
    proc = vmmalloc_cmd("demo", "--backend", "cuda")
    assert proc.returncode != 0 and "use --backend host" in proc.stderr


def test_run_passes_the_exit_status_through():
    proc = vmmalloc_cmd("run", "--", sys.executable, "-c", "import os, sys; print(os.environ['VMMALLOC']); sys.exit(3)")
    assert proc.returncode == 3
    assert proc.stdout.splitlines()[0] == "1"
    assert "no process reported" in proc.stdout  # it used no CUDA memory


def test_run_prints_each_reporting_process(tmp_path):
    # A report as a process under vmmalloc writes it at exit (vmmalloc.process_report).
    from vmmalloc import run_command

    reports = [{"pid": 42, "argv": ["train.py"], "devices": {"0": {
        "reserved_bytes.all.peak": 3 << 30, "allocated_bytes.all.peak": 2 << 30, "requested_bytes.all.peak": 0,
        "vmm.stitches": 17, "vmm.stitched_bytes": 0, "vmm.kv_mapped_bytes.peak": 1 << 30, "num_alloc_retries": 0,
        "num_ooms": 1, "num_device_alloc": 0, "num_device_free": 0}}}]
    lines = run_command.format_reports(reports)
    assert "42 train.py" in lines[1]
    assert "3.00 GiB" in lines[1] and "2.00 GiB" in lines[1] and "1.50" in lines[1] and " 17 " in lines[1]


def test_outside_a_checkout_bench_and_report_are_not_offered(monkeypatch, capsys):
    """A wheel has no bench/: its command offers what it can do."""
    monkeypatch.setattr(cli, "find_checkout", lambda: None)
    parser = cli.build_parser()
    choices = next(a for a in parser._actions if a.dest == "command_name").choices
    assert set(choices) == {"demo", "run", "replay"}
    with pytest.raises(SystemExit):
        parser.parse_args(["report"])
    assert "invalid choice: 'report'" in capsys.readouterr().err


def test_report_without_write_prints_and_edits_nothing():
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "README.md", ROOT / "bench" / "RESULTS.md")}
    proc = vmmalloc_cmd("report")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| benchmark | measure | value | target |")
    assert {p: p.stat().st_mtime_ns for p in before} == before, "a user command edits no source tree unasked"


def test_report_is_written_from_the_stored_results(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    readme = tmp_path / "README.md"
    from bench import report

    readme.write_text(f"intro\n{report.HEADLINE_BEGIN}\nold table\n{report.HEADLINE_END}\noutro\n")
    written = cli.main(["report", "--results", str(results), "--output", str(tmp_path / "RESULTS.md"),
                        "--readme", str(readme), "--no-plots"])
    assert written == 0
    text = (tmp_path / "RESULTS.md").read_text()
    stored = sorted(p.stem for p in results.glob("*.json"))
    for stem in stored:
        assert f"## {stem}" in text
    assert "| fragmentation | reserved/allocated, vmmalloc |" in text
    assert "NVIDIA" in text and "torch 2." in text
    new_readme = readme.read_text()
    assert "old table" not in new_readme and new_readme.startswith("intro\n") and new_readme.endswith("outro\n")
    assert "| benchmark | measure | value | target | |" in new_readme


def test_report_marks_targets_met_and_missed():
    from bench import report

    assert report.target_met("1.000", "<= 1.05") is True
    assert report.target_met("1.17x", ">= 1.25x") is False
    assert report.target_met("101 ns", "< 200 ns") is True
    assert report.target_met("18 / 21", "") is None
    assert report.target_met("1.0 / 2.0", "<= 1.05") is None  # two figures: not judged


def test_report_refuses_bad_or_missing_results(tmp_path):
    from bench import report

    with pytest.raises(SystemExit, match="no results"):
        report.write_report(tmp_path, tmp_path / "R.md")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit, match="broken.json is not valid JSON"):
        report.write_report(tmp_path, tmp_path / "R.md")


def test_report_draws_the_plots_its_benchmarks_define(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(RESULTS / "offload.json", results / "offload.json")
    from bench import report

    written = report.write_report(results, tmp_path / "RESULTS.md")
    png = results / "offload.png"
    assert png in written and png.read_bytes()[:4] == b"\x89PNG"
    assert "![offload](results/offload.png)" in (tmp_path / "RESULTS.md").read_text()


def test_the_readme_headline_is_the_reports():
    from bench import report

    text = (ROOT / "README.md").read_text()
    begin, end = text.index(report.HEADLINE_BEGIN), text.index(report.HEADLINE_END)
    table = text[begin + len(report.HEADLINE_BEGIN):end].strip().splitlines()
    assert table == report.headline_table(report.load_results(RESULTS)), "run `vmmalloc report`"


def test_demo_on_the_host_backend(tmp_path):
    proc = vmmalloc_cmd("demo", "--backend", "host", "--quick", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "No GPU here" in out or "host backend" in out
    for row in ("peak reserved", "peak allocated", "reserved / allocated", "stitches", "KV memory held"):
        assert row in out
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "vmmalloc.pickle", "rb") as f:
        snapshot = pickle.load(f)
    ratio_line = next(line for line in out.splitlines() if line.startswith("reserved / allocated"))
    native, vmm = (float(x) for x in ratio_line.split()[-2:])
    assert vmm <= 1.05 < native  # stitching and in-place KV keep reserved near allocated here
    assert snapshot["device_traces"][0], "the vmmalloc side recorded its events"


@pytest.mark.gpu
@pytest.mark.skipif(not vmmalloc.cuda_available(), reason=vmmalloc.cuda_unavailable_reason() or "no CUDA")
def test_demo_on_the_gpu(tmp_path):
    proc = vmmalloc_cmd("demo", "--backend", "cuda", "--quick", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU: a Llama" in proc.stdout and "KV memory held" in proc.stdout
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "vmmalloc.pickle", "rb") as f:
        snapshot = pickle.load(f)
    assert any(e["action"] == "alloc" for e in snapshot["device_traces"][0])
    for side in ("native", "vmmalloc"):
        series = json.loads((tmp_path / f"{side}_timeline.json").read_text())
        assert series["seconds"][0] == 0 and max(series["allocated"]) > 1 << 30, side  # the weights alone


@pytest.mark.gpu
@pytest.mark.skipif(not vmmalloc.cuda_available(), reason=vmmalloc.cuda_unavailable_reason() or "no CUDA")
def test_run_reports_a_torch_program_and_its_history(tmp_path):
    program = ("import torch; xs = [torch.empty(n << 20, dtype=torch.uint8, device='cuda') for n in (3, 5, 9)]; "
               "del xs[1]; y = torch.empty(4 << 20, dtype=torch.uint8, device='cuda')")
    proc = vmmalloc_cmd("run", "--history", "1000", "--out", str(tmp_path), "--", sys.executable, "-c", program)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["devices"]["0"]["allocated_bytes.all.peak"] >= 17 << 20
    assert "timeline:" in proc.stdout and "snapshot" in proc.stdout
    with open(report["snapshot"], "rb") as f:
        snapshot = pickle.load(f)
    sizes = [e["size"] for e in snapshot["device_traces"][0] if e["action"] == "alloc"]
    assert {4 << 20, 6 << 20, 10 << 20} <= set(sizes)  # 3, 5, 9 MiB rounded up to chunks


@pytest.mark.parametrize("setup, args, message", [
    (None, ["missing.pickle"], "missing.pickle: no such file"),
    ("junk", ["{path}"], "is not a memory snapshot or a vmmalloc trace"),
    ("dict", ["{path}"], "is not a memory snapshot or a vmmalloc trace"),
    ("dict", ["{path}", "--conf", "bogus:1"], "unknown key 'bogus'"),
    ("dict", ["{path}", "--device-memory", "lots"], "vmmalloc replay:"),
])
def test_replay_says_what_is_wrong_in_one_line(tmp_path, setup, args, message):
    import pickle

    path = tmp_path / "snap.pickle"
    if setup == "junk":
        path.write_bytes(b"not a pickle at all")
    elif setup == "dict":
        path.write_bytes(pickle.dumps({"segments": []}))
    command = [sys.executable, "-m", "vmmalloc", "replay", *(a.format(path=path) for a in args)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_command_without_its_extra_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a))
    with pytest.raises(SystemExit, match=r"vmmalloc demo needs tqdm: pip install 'vmmalloc\[cli\]'"):
        cli.main(["demo"])
