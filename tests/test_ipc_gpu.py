"""CUDA tensors shared between processes under vmmalloc (Note [Adapter IPC]): torch.multiprocessing
spawn children that read and write the parent's tensors (small-pool blocks, large handles,
stitched blocks, views), a sender that frees while the receiver holds, round trips that leak
nothing, and the two mixed cases (a native receiver is told what to do; a native sender's
tensor opens under vmmalloc)."""
from __future__ import annotations

from pathlib import Path

from test_torch_gpu import pytestmark, run  # noqa: F401  (the GPU marks apply here too)

TESTS = str(Path(__file__).parent)

PARENT = f"""
import torch.multiprocessing as mp
sys.path.insert(0, {TESTS!r})
import ipc_scenarios as sc
from vmmalloc import ipc
vmmalloc.enable_vmm_allocator(growth_slack=0.0)   # a miss stitches free chunks before it grows
ctx = mp.get_context("spawn")
def start(vmm):
    if vmm: os.environ["VMMALLOC"] = "1"
    else: os.environ.pop("VMMALLOC", None)
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=sc.receiver, args=(inbox, outbox))
    child.start()
    def ask(*message):
        inbox.put(message)
        return outbox.get(timeout=180)
    return child, inbox, outbox, ask
"""

SHARING = PARENT + """
child, inbox, outbox, ask = start(vmm=True)
pad = torch.ones(100, device="cuda")                # the next small block is not at its segment's start
small = torch.arange(1000.0, device="cuda")
big = torch.ones(40 * MiB // 4, device="cuda")      # two 16 MiB handles and four 2 MiB chunks
exact = torch.full((16 * MiB // 4,), 3.0, device="cuda")
parts = [torch.empty(4 * MiB // 4, device="cuda") for _ in range(8)]
keep = parts[1::2]
del parts
torch.cuda.synchronize()
stitches = torch.cuda.memory_stats()["vmm.stitches"]
stitched = torch.full((14 * MiB // 4,), 2.0, device="cuda")  # from the four freed 4 MiB holes
stitched_now = torch.cuda.memory_stats()["vmm.stitches"] > stitches
view = stitched[1000:]
handle = small.untyped_storage()._share_cuda_()
cases = {}
for name, t in [("small", small), ("big", big), ("exact", exact), ("view", view)]:
    expect = float(t.double().sum())
    kind, seen = ask("check", t, True)
    torch.cuda.synchronize()
    cases[name] = dict(kind=kind, seen=seen, expect=expect, written=float(t.reshape(-1)[0]))
# the parent frees while the child holds
before = torch.cuda.memory_allocated()
held = torch.full((8 * MiB // 4,), 3.0, device="cuda")
kind, held_sum = ask("hold", held)
del held
filler = torch.full((8 * MiB // 4,), 5.0, device="cuda")
while_held = torch.cuda.memory_allocated()
kind, verified = ask("verify", 0)
del filler
torch.cuda.ipc_collect()
after_release = torch.cuda.memory_allocated()
# round trips
t = torch.zeros(4 * MiB // 4, device="cuda"); ask("loop", t); del t
torch.cuda.ipc_collect(); torch.cuda.synchronize(); torch.cuda.empty_cache()
fds0, free0, child_fds0 = sc.open_fds(), torch.cuda.mem_get_info()[0], ask("fds")[1]
for i in range(200):
    t = torch.zeros((4 + i % 3) * MiB // 4, device="cuda")
    ask("loop", t)
    del t
torch.cuda.ipc_collect(); torch.cuda.synchronize(); torch.cuda.empty_cache()
fds1, free1, child_fds1 = sc.open_fds(), torch.cuda.mem_get_info()[0], ask("fds")[1]
inbox.put(None); outbox.get(timeout=60)
child.join(60)
# a receiver on PyTorch's own allocator
native, _, _, native_ask = start(vmm=False)
native_kind, native_message = native_ask("check", small, False)
native.join(60)
report(cases=cases, vmm_handle=ipc.is_vmmalloc_handle(handle[1]), small_offset=handle[3],
       stitched=stitched_now, held_sum=held_sum, verified=verified, before=before,
       while_held=while_held, after_release=after_release, fds=[fds0, fds1],
       child_fds=[child_fds0, child_fds1], free=[free0, free1], exitcode=child.exitcode,
       native_kind=native_kind, native_message=native_message)
"""

NATIVE_SENDER = f"""
import torch.multiprocessing as mp
sys.path.insert(0, {TESTS!r})
import ipc_scenarios as sc
ctx = mp.get_context("spawn")
os.environ["VMMALLOC"] = "1"
inbox, outbox = ctx.Queue(), ctx.Queue()
child = ctx.Process(target=sc.receiver, args=(inbox, outbox))
child.start()
tensor = torch.full((3 * MiB // 4,), 7.0, device="cuda")
inbox.put(("check", tensor, True))
kind, seen = outbox.get(timeout=180)
torch.cuda.synchronize()
inbox.put(None); outbox.get(timeout=60); child.join(60)
report(kind=kind, seen=seen, expect=7.0 * (3 * MiB // 4), written=float(tensor[0]),
       backend=torch.cuda.get_allocator_backend())
"""


def test_children_read_and_write_shared_tensors_and_nothing_leaks():
    r = run(SHARING)
    for name, case in r["cases"].items():
        assert case["kind"] == "sum" and case["seen"] == case["expect"], (name, case)
        assert case["written"] == 1.0, (name, case)  # the child's write is the parent's memory
    assert r["vmm_handle"] and r["small_offset"] > 0, r
    assert r["stitched"], "the view's block was meant to be stitched"
    # the parent freed its tensor while the child held it: the child's data stayed, and the
    # memory was neither reused (the filler is extra) nor kept after both were done
    assert r["held_sum"] == r["verified"] == 3.0 * (8 * (1 << 20) // 4), r
    assert r["while_held"] >= r["before"] + (16 << 20), r
    assert r["after_release"] == r["before"], r
    assert r["fds"][1] <= r["fds"][0] + 2 and r["child_fds"][1] <= r["child_fds"][0] + 2, r
    assert abs(r["free"][1] - r["free"][0]) <= 2 << 20, r
    assert r["native_kind"] == "error" and "VMMALLOC=1" in r["native_message"], r


def test_a_tensor_from_pytorchs_own_allocator_opens_under_vmmalloc():
    r = run(NATIVE_SENDER)
    assert r["backend"] == "native", r
    assert r["kind"] == "sum" and r["seen"] == r["expect"] and r["written"] == 1.0, r
