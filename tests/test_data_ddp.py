"""Two real ranks under torchrun (gloo, CPU): disjoint samples, identical batch counts, exact resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import count_duplicates, write_index_shards

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

REPO = Path(__file__).resolve().parents[1]


def test_two_ranks_three_shards_two_workers(tmp_path):
    # uneven shards, and fewer shards (3) than ranks x workers (4): the hard case
    sizes = [23, 17, 20]
    write_index_shards(tmp_path / "shards", sizes)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "data_helpers.py"), str(tmp_path / "shards" / "train-*.tar"), str(out), "2", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    expected = sum(sizes) // (4 * 2)  # 60 // 8 = 7 full batches per rank
    for mode in ("finite", "resampled"):
        for rank in ranks:
            assert rank[mode]["batches_per_epoch"] == expected
            assert [len(e) for e in rank[mode]["epochs"]] == [expected, expected]
    assert [len(r["resampled"]["resumed"]) for r in ranks] == [1, 1]
    assert [r["resampled"]["resumed"][0] for r in ranks] == [expected - 3] * 2

    for epoch in range(2):
        seen = [[i for batch in r["finite"]["epochs"][epoch] for i in batch] for r in ranks]
        assert ranks[0]["finite"]["mode"] == "sample"
        assert not set(seen[0]) & set(seen[1]), f"epoch {epoch}: ranks share samples"
        assert count_duplicates(seen[0]) == 0 and count_duplicates(seen[1]) == 0
        assert all(0 <= i < sum(sizes) for i in seen[0] + seen[1])
        assert len(set(seen[0]) | set(seen[1])) == expected * 4 * 2
    # epochs differ (reshuffled), and resuming epoch 1 at batch 3 gives exactly its tail
    assert ranks[0]["finite"]["epochs"][0] != ranks[0]["finite"]["epochs"][1]
    for rank in ranks:
        assert rank["finite"]["resumed"] == rank["finite"]["epochs"][1][3:]
