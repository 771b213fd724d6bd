"""Data-parallel training (torch.distributed): one recording, one bundle, from every rank.

Under `DistributedDataParallel` each rank computes the gradient of its own batch and the
all-reduce averages them, so `.grad` is the same on every rank: (1/world)·Σ_ranks Σ g kᵀ. Each
rank records its own patterns. The gradient-scale check (gradscale.py) sums the recorded
projections over the ranks before comparing them with `.grad`, so the scale it measures (1/world
for DDP's average, times any clipping or loss scaling) is proven, not assumed, and is the same on
every rank. Every decision that leads to a collective call (commit the pending steps, bring the
journal up to date, stop on a signal) is taken together, by one small all-reduce per step.

Each rank journals into its own spool, `.NAME.safetensors.spool-<run>-rank<r>of<n>-*`. When the
recording ends, rank 0 merges the ranks' journals into one bundle (`merge`): patterns in step
order and, within a step, in rank order (the order a single process would see the global batch
in); the weights, w0 and step coefficients of the rank whose journal is the oldest (they are
the same on every rank); the label and task tables of the examples each rank saw. `dualtui
recover` does the same after a SIGKILL. torch.distributed is the engine; nothing here talks
between processes on its own.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import RecorderError

SPOOL_RANK = re.compile(r"\.spool-(?P<run>[0-9a-f]{8})-rank(?P<rank>\d+)of(?P<world>\d+)-")


@dataclass
class World:
    rank: int
    size: int
    backend: str
    run: str  # one token per recording, the same on every rank: names the ranks' spools

    @property
    def spool_tag(self) -> str:
        return f"{self.run}-rank{self.rank}of{self.size}-"

    def _device(self, like: torch.Tensor) -> torch.device:
        return like.device if self.backend == "nccl" else torch.device("cpu")

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks (float64 on the backend's device; returned on t's device)."""
        import torch.distributed as dist

        x = t.detach().to(device=self._device(t), dtype=torch.float64).contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(t.device)

    def max_of(self, *values: int) -> list[int]:
        """The largest of each value over the ranks (one all-reduce): a flag set on one rank is
        set on all, a signal number received by one is known to all."""
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        x = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return [int(v) for v in x.tolist()]

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def detect() -> World | None:
    """The process group, when the recording runs on more than one rank."""
    try:
        import torch.distributed as dist
    except ImportError:  # a build without distributed support
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    world = World(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()), "")
    world.run = world.broadcast(secrets.token_hex(4) if world.rank == 0 else None)
    return world


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel (and DataParallel) wrap the user's module as `.module`: record the
    module itself, so layer names are the same as in a single-process run."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def rank_spools(spool: Path) -> list[Path] | None:
    """All ranks' spools of the run `spool` belongs to (None for a single-process spool).
    Raises when one is missing."""
    m = SPOOL_RANK.search(spool.name)
    if m is None:
        return None
    run, world = m["run"], int(m["world"])
    found: dict[int, Path] = {}
    for p in spool.parent.iterdir():
        mm = SPOOL_RANK.search(p.name)
        if mm and mm["run"] == run and (p / "journal.json").exists():
            found[int(mm["rank"])] = p
    missing = [r for r in range(world) if r not in found]
    if missing:
        raise RecorderError(f"{spool}: the spools of rank{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))} of this {world}-process recording are missing")
    return [found[r] for r in range(world)]


def merge(journals: list[dict], out_writer: Any, loaders: list[Any]) -> tuple[dict, dict[str, str], list[Any]]:
    """Merge the ranks' journals into `out_writer` (a BundleWriter with a fresh spool): appends
    every layer's patterns in step order (rank order within a step) up to the step every rank
    journaled. Returns (the state of the rank with the oldest journal, the merged label and
    task tables, that rank's index)."""
    from ..bundle.manifest import LayerSpec

    steps = [j["state"]["step"] for j in journals]
    base = int(np.argmin(steps))
    upto = steps[base]
    state = dict(journals[base]["state"])
    order = state["layer_order"]
    for j in journals:
        if j["state"]["layer_order"] != order:
            raise RecorderError("the ranks recorded different layers: " + ", ".join(order))
    for L in order:
        lay = journals[base]["layers"][L]
        fields = tuple(lay["fields"])
        out_writer.add_layer(LayerSpec.from_json(lay["spec"]), with_position="position" in fields)
        cursors = [_Rows(j["layers"][L]["chunks"], loaders[r], fields) for r, j in enumerate(journals)]
        for s in range(upto):  # per step, rank order: the order of the global batch
            for cur in cursors:
                rows = cur.take_step(s)
                if rows is not None:
                    out_writer.append(L, **rows)
    # the label and task tables: each rank knows the examples it saw
    tables = {}
    for key in ("train/label", "train/task"):
        arrays = [loaders[r](j["arrays"][key]) for r, j in enumerate(journals)]
        n = max(a.shape[0] for a in arrays)
        merged = np.zeros(n, dtype=np.int64)
        merged[: arrays[base].shape[0]] = arrays[base]
        for r, j in enumerate(journals):
            if r == base:
                continue
            seen = _seen(j, loaders[r])
            seen = seen[seen < arrays[r].shape[0]]
            merged[seen] = arrays[r][seen]
        tables[key] = merged
    state["check_failures"] = sorted({f for j in journals for f in j["state"].get("check_failures", [])})
    state["extra"] = {**state.get("extra", {}), "distributed": {"world_size": len(journals),
                                                               "merged_from_step": upto}}
    return state, tables, base


class _Rows:
    """One rank's patterns of one layer, read in step order, one step at a time."""

    def __init__(self, chunks: list[dict], load: Any, fields: tuple[str, ...]):
        self.chunks, self.load, self.fields = chunks, load, fields
        self.c, self.row = 0, 0
        self.data: dict[str, np.ndarray] | None = None

    def _open(self) -> bool:
        while self.data is None or self.row >= len(self.data["step"]):
            if self.c >= len(self.chunks):
                return False
            self.data = {f: self.load(self.chunks[self.c]["files"][f], mmap=True) for f in self.fields}
            self.c += 1
            self.row = 0
        return True

    def take_step(self, s: int) -> dict[str, np.ndarray] | None:
        parts: list[dict[str, np.ndarray]] = []
        while self._open():
            step = self.data["step"]
            if step[self.row] != s:
                break
            end = self.row + int(np.searchsorted(step[self.row:], s, side="right"))
            parts.append({f: np.asarray(self.data[f][self.row:end]) for f in self.fields})
            self.row = end
            if end < len(step):
                break
        if not parts:
            return None
        return {f: np.concatenate([p[f] for p in parts]) for f in self.fields}


def _seen(journal: dict, load: Any) -> np.ndarray:
    ids = [np.asarray(load(c["files"]["example"], mmap=True)) for lay in journal["layers"].values() for c in lay["chunks"]]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)
