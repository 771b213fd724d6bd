"""The CUDA transfer logic (double-buffered pinned staging, copies overlapped with compute),
exercised on CPU with a recording stand-in for the CUDA stream API."""

from __future__ import annotations

import torch

from dualtui.engine.stream import overlapped_blocks


class FakeTransfer:
    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.allocated = 0

    def pinned(self, shape, dtype):
        self.allocated += 1
        return torch.empty(shape, dtype=dtype)

    def copy_async(self, host):
        event = object()
        self.log.append(("copy", host.data_ptr(), event))
        return host.clone(), event  # the "device" copy

    def compute_waits(self, event, tensors):
        self.log.append(("compute_waits", event))

    def host_waits(self, event):
        self.log.append(("host_waits", event))


def _host(n_blocks: int, rows: int = 5):
    for b in range(n_blocks):
        keys = torch.arange(rows * 3, dtype=torch.float16).reshape(rows, 3) + 100 * b
        yield b * rows, {"keys": keys, "example": torch.arange(rows) + b * rows}


def test_blocks_arrive_intact_and_in_order() -> None:
    fake = FakeTransfer()
    blocks = []
    for blk in overlapped_blocks(_host(5), fake):
        blocks.append((blk.start, blk.tensors["keys"].clone(), blk.tensors["example"].clone()))
    expected = list(_host(5))
    assert [b[0] for b in blocks] == [e[0] for e in expected]
    for (_, k, ex), (_, e) in zip(blocks, expected):
        assert k.dtype == torch.float32  # widened on the device side
        assert torch.equal(k, e["keys"].float())
        assert torch.equal(ex, e["example"])


def test_next_copy_is_launched_before_the_current_block_is_used() -> None:
    fake = FakeTransfer()
    seen_copies = []
    for _ in overlapped_blocks(_host(4), fake):
        seen_copies.append(sum(1 for entry in fake.log if entry[0] == "copy"))
    # two fields per block: when block i is handed over, block i+1's copies are already queued
    assert seen_copies == [4, 6, 8, 8]


def test_two_pinned_buffers_per_field_are_reused_safely() -> None:
    fake = FakeTransfer()
    list(overlapped_blocks(_host(6), fake))
    assert fake.allocated == 4  # 2 slots × 2 fields, whatever the number of blocks
    # a slot is refilled only after waiting for the copy that last read it
    copies = [e for e in fake.log if e[0] == "copy"]
    waits = [e for e in fake.log if e[0] == "host_waits"]
    assert len(waits) == 4  # blocks 2..5 reuse a slot
    for w in waits:
        assert any(c[2] is w[1] for c in copies)
