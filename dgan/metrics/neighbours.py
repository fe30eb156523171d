"""Nearest-neighbour distances between large sets, in chunks, so memory stays bounded.

A 100k-image training set against 1000 samples would be a 100M-entry distance matrix at once; here
at most `chunk` x `chunk` distances exist at any time, and only the running k best per query are
kept. Euclidean distances (torch.cdist) on float32 rows: features, or flattened pixels.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 4096


def _as_rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).float()


def nearest(query: Tensor, bank: Tensor, k: int = 1, *, exclude_self: bool = False,
            chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """(distances [Nq, k], indices [Nq, k]) of each query row's k nearest rows of `bank`, nearest first.

    exclude_self: query and bank are the same set; a row is not its own neighbour.
    """
    if bank.shape[0] < k + int(exclude_self):
        raise ValueError(f"need more than {k} rows in the bank, got {bank.shape[0]}")
    dists, idx = [], []
    for q0 in range(0, query.shape[0], chunk):
        q = _as_rows(query[q0:q0 + chunk])
        best_d = torch.full((q.shape[0], k), float("inf"))
        best_i = torch.zeros((q.shape[0], k), dtype=torch.long)
        for b0 in range(0, bank.shape[0], chunk):
            d = torch.cdist(q, _as_rows(bank[b0:b0 + chunk]))
            if exclude_self:
                rows = torch.arange(q.shape[0])
                cols = rows + q0 - b0
                inside = (cols >= 0) & (cols < d.shape[1])
                d[rows[inside], cols[inside]] = float("inf")
            cand_d = torch.cat([best_d, d], dim=1)
            cand_i = torch.cat([best_i, torch.arange(b0, b0 + d.shape[1]).expand(q.shape[0], -1)], dim=1)
            best_d, pos = cand_d.topk(k, dim=1, largest=False)
            best_i = cand_i.gather(1, pos)
        dists.append(best_d)
        idx.append(best_i)
    return torch.cat(dists), torch.cat(idx)


def kth_neighbour_radius(x: Tensor, k: int, chunk: int = CHUNK) -> Tensor:
    """Each row's distance to its k-th nearest other row of the same set [N]."""
    return nearest(x, x, k, exclude_self=True, chunk=chunk)[0][:, -1]
