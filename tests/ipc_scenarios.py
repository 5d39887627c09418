"""Processes for tests/test_ipc_gpu.py: a parent and torch.multiprocessing spawn children
sharing CUDA tensors. A module (not test code strings) because spawn children import the
functions they run. Each child answers on a result queue; nothing here asserts."""
from __future__ import annotations

import os
import traceback

MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def receiver(inbox, outbox) -> None:
    """Reads ('check', tensor, expected_sum): replies the sum it sees, then writes 1 at [0] when
    asked; ('hold', tensor): keeps it until ('verify', expected); ('loop', n): n round trips;
    None: stop. Every failure is replied, not raised."""
    import torch

    held = None
    while True:
        try:
            message = inbox.get()
        except Exception as error:  # noqa: BLE001  (the native-receiver case ends here)
            outbox.put(("error", f"{type(error).__name__}: {error}"))
            return
        if message is None:
            outbox.put(("fds", open_fds()))
            return
        try:
            kind = message[0]
            if kind == "check":
                _, tensor, write = message
                seen = float(tensor.double().sum())
                if write:
                    tensor.view(-1)[0] = 1.0
                torch.cuda.synchronize()
                del tensor
                outbox.put(("sum", seen))
            elif kind == "hold":
                held = message[1]
                outbox.put(("held", float(held.double().sum())))
            elif kind == "verify":
                seen = float(held.double().sum())
                del held
                held = None
                torch.cuda.synchronize()
                outbox.put(("verified", seen))
            elif kind == "fds":
                outbox.put(("fds", open_fds()))
            elif kind == "loop":
                tensor = message[1]
                tensor.add_(1)
                torch.cuda.synchronize()
                del tensor
                outbox.put(("looped", 0))
        except Exception:  # noqa: BLE001
            outbox.put(("error", traceback.format_exc()))

