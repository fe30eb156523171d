"""dgan.distributed's rank-tagged output."""
from __future__ import annotations

import sys

from dgan import distributed as dist


class CountingStream:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_print_rank_writes_its_whole_line_in_one_call(monkeypatch):
    # The ranks of a torchrun job share one stderr pipe: a line must reach it in one write (atomic on a
    # pipe up to PIPE_BUF), or two ranks' lines run together, as print()'s text-then-newline did.
    stream = CountingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    dist.print_rank("stopped at step 3 with a checkpoint; exit code 75")
    assert stream.writes == ["[rank 0] stopped at step 3 with a checkpoint; exit code 75\n"]
