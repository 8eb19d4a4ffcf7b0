"""The memory bank, sharded by camera (DESIGN §3 memory, §4 sharding).

Each rank holds only the rows of its cameras: ``rows`` (N_r, D) L2-normalised (fp32, or bf16 to halve it),
with their ``global_ids`` (row index in the whole training set), ``cams`` and ``tracklets``. With one
process the bank simply holds every row. An anchor's row always lives on its own rank, so fill and update
are local; only the per-camera centroid sums (a num_cameras × D table) cross ranks.
Checkpoints store rows by global id, one file per rank, so a run can resume with another world size.
"""

from __future__ import annotations

import glob
import os

import torch
import torch.nn.functional as F

from reid import dist
from reid.errors import ReidError
from reid.loss_terms import MemoryShard

SHARD_PATTERN = "memory_rank{rank:05d}_of{world:05d}.pt"


class MemoryBank:
    """This rank's memory rows.

    global_ids, cams, tracklets: (N_r,) int; dim: D; num_cameras: cameras in the whole training set
    (camera ids are 0..num_cameras-1). Rows start at zero until ``fill``.
    """

    def __init__(self, global_ids, cams, tracklets, dim: int, num_cameras: int, device=None,
                 dtype=torch.float32):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.global_ids = torch.as_tensor(global_ids).long().to(device)
        self.cams = torch.as_tensor(cams).long().to(device)
        self.tracklets = torch.as_tensor(tracklets).long().to(device)
        n = self.global_ids.numel()
        if self.cams.shape != (n,) or self.tracklets.shape != (n,):
            raise ReidError(f"MemoryBank: cams {tuple(self.cams.shape)} / tracklets {tuple(self.tracklets.shape)} "
                            f"given, expected ({n},) like global_ids")
        if n and (int(self.cams.min()) < 0 or int(self.cams.max()) >= num_cameras):
            raise ReidError(f"MemoryBank: camera ids in [{int(self.cams.min())}, {int(self.cams.max())}] given, "
                            f"expected 0..{num_cameras - 1} (num_cameras={num_cameras})")
        if dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ReidError(f"MemoryBank: dtype {dtype} given, expected float32 or bfloat16 (float64 for tests)")
        self.dim, self.num_cameras, self.device, self.dtype = dim, num_cameras, device, dtype
        self.rows = torch.zeros(n, dim, dtype=dtype, device=device)
        # global id → local row: a sorted copy of the ids and searchsorted (no N-sized dict, works on GPU).
        self._sorted_ids, self._order = torch.sort(self.global_ids)
        if n > 1 and bool((self._sorted_ids[1:] == self._sorted_ids[:-1]).any()):
            raise ReidError("MemoryBank: global_ids contain duplicates, expected one row per id")
        self._camera_rows = None  # global rows per camera, asked of all ranks once
        self._shard = None  # what the loss reads (reid.loss_terms.MemoryShard), built once
        self._sums = None  # this rank's per-camera row sums (num_cameras, D), kept up to date by update()
        self._work_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # bf16 rows: fp32 math

    def __len__(self) -> int:
        return self.global_ids.numel()

    def local_index(self, global_ids, check: bool = True) -> torch.Tensor:
        """Positions in ``rows`` of the given global ids (all must be this rank's), (k,) int64. ``check=False`` skips
        the verification (a host synchronisation) where the caller guarantees it, as the training step does."""
        ids = torch.as_tensor(global_ids, device=self.device).long().reshape(-1)
        if len(self) == 0:
            if ids.numel():
                raise ReidError(f"MemoryBank: rows {ids[:5].tolist()} asked of a rank that holds no rows")
            return ids
        pos = torch.searchsorted(self._sorted_ids, ids).clamp(max=len(self) - 1)
        if check:
            found = self._sorted_ids[pos] == ids
            if not bool(found.all()):
                bad = ids[~found][:5].tolist()
                raise ReidError(f"MemoryBank: global rows {bad} are not held by rank {dist.rank()}, "
                                "expected only this rank's (its cameras') rows")
        return self._order[pos]

    def fill(self, global_ids, features) -> None:
        """Set rows from a full feature pass. features: (k, D); normalised here."""
        pos = self.local_index(global_ids)
        features = torch.as_tensor(features).detach().to(self.device, self._work_dtype)
        if features.shape != (pos.numel(), self.dim):
            raise ReidError(f"MemoryBank.fill: features {tuple(features.shape)} given, "
                            f"expected ({pos.numel()}, {self.dim})")
        self.rows[pos] = F.normalize(features, dim=1).to(self.dtype)
        self._sums = None  # recomputed from the rows when next needed

    @torch.no_grad()
    def update(self, global_ids, features, check: bool = True) -> None:
        """``m ← normalize(½·m + ½·f)`` for this rank's rows (DESIGN §3); after the loss, never before it.

        features: (k, D). In-place on ``rows``, so a loss that still needs the old rows for backward
        fails loudly (autograd's version check) instead of using the new ones. No host synchronisation with
        ``check=False`` (see ``local_index``).
        """
        pos = self.local_index(global_ids, check=check)
        if self._sums is not None:  # a row drawn twice in a batch changes the running sums once
            pos_sorted = pos.sort().values
            first = torch.ones_like(pos_sorted, dtype=torch.bool)
            first[1:] = pos_sorted[1:] != pos_sorted[:-1]
            before = self.rows[pos_sorted].to(self._work_dtype)
        mixed = 0.5 * self.rows[pos].to(self._work_dtype) + 0.5 * features.detach().to(self.device, self._work_dtype)
        self.rows[pos] = F.normalize(mixed, dim=1).to(self.dtype)
        if self._sums is not None:  # running per-camera sums (DESIGN §4): no pass over all rows per step
            change = (self.rows[pos_sorted].to(self._work_dtype) - before) * first[:, None]
            self._sums.index_add_(0, self.cams[pos_sorted], change)

    def camera_rows(self) -> torch.Tensor:
        """(num_cameras,) int64: rows of each camera over all ranks (fixed for the bank's life)."""
        if self._camera_rows is None:
            local = torch.bincount(self.cams, minlength=self.num_cameras)
            self._camera_rows = dist.sum_across_ranks(local)
        return self._camera_rows

    def shard(self) -> MemoryShard:
        """This rank's rows as the loss reads them, with the tracklet index and the global camera counts (built on
        first use: one collective and a few host synchronisations for the bank's life, none per step)."""
        if self._shard is None:
            self._shard = MemoryShard.build(self.rows, self.cams, self.tracklets, self.global_ids, self.camera_rows(),
                                            self.camera_statistics)
        self._shard.rows = self.rows
        return self._shard

    @torch.no_grad()
    def camera_centroids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``C_c = normalize(Σ_{j: c_j=c} m_j)`` over all ranks (DESIGN §3; the sum's direction = the mean's).

        Returns ``(centroids (num_cameras, D) fp32 (fp64 for an fp64 bank), present (num_cameras,) bool)``;
        cameras with no rows anywhere have ``present`` False and a zero row: use ``centroids[present]``.
        """
        centroids, present, _ = self.camera_statistics()
        return centroids, present

    @torch.no_grad()
    def camera_statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``camera_centroids()`` plus the per-camera row sums (num_cameras, D) over all ranks, from one all-reduce
        (the loss's camera term and, with loss.variant center, the camera means)."""
        if self._sums is None:
            self._sums = torch.zeros(self.num_cameras, self.dim, dtype=self._work_dtype, device=self.device)
            self._sums.index_add_(0, self.cams, self.rows.to(self._work_dtype))
        sums = dist.sum_across_ranks(self._sums)
        present = self.camera_rows() > 0
        return F.normalize(sums, dim=1), present, sums

    def nbytes(self) -> int:
        """Bytes held by this rank: rows plus ids, cameras and tracklets."""
        return sum(t.numel() * t.element_size() for t in (self.rows, self.global_ids, self.cams, self.tracklets))

    def save(self, directory: str) -> dict:
        """Write this rank's rows keyed by global id to ``directory`` (durably: fsync'ed, then renamed).
        Returns ``{file name: {"bytes", "sha256"}}`` for the checkpoint's manifest."""
        from reid.checkpoint import write_durably

        os.makedirs(directory, exist_ok=True)
        name = SHARD_PATTERN.format(rank=dist.rank(), world=dist.world_size())
        # The running per-camera sums too: recomputing them from the rows on load would round differently, and a
        # resumed run would no longer retrace an uninterrupted one bit for bit.
        state = {"global_ids": self.global_ids.cpu(), "rows": self.rows.cpu(), "cams": self.cams.cpu(),
                 "tracklets": self.tracklets.cpu(), "sums": None if self._sums is None else self._sums.cpu()}
        return {name: write_durably(os.path.join(directory, name), state)}

    @torch.no_grad()
    def load(self, directory: str, names: list[str] | None = None) -> None:
        """Take this rank's rows from the shard files ``names`` in ``directory`` (saved with any world size; a
        checkpoint's manifest names them), or from every shard file there when ``names`` is None (old layout).

        Reads one shard at a time, so no rank ever holds all N rows. Every own row must be found.
        """
        files = (sorted(glob.glob(os.path.join(directory, "memory_rank*_of*.pt"))) if names is None
                 else [os.path.join(directory, n) for n in names])
        if not files:
            raise ReidError(f"memory checkpoint: no memory_rank*_of*.pt files in {directory}")
        have = torch.zeros(len(self), dtype=torch.bool, device=self.device)
        sums = None
        own_file = SHARD_PATTERN.format(rank=dist.rank(), world=dist.world_size())
        for path in files:
            shard = torch.load(path, map_location="cpu", weights_only=True)
            if os.path.basename(path) == own_file and shard.get("sums") is not None:
                sums = shard["sums"]  # saved by this rank at this world size: exactly this rank's rows
            if shard["rows"].shape[1:] != (self.dim,):
                raise ReidError(f"memory checkpoint {path}: rows of width {shard['rows'].shape[1]}, "
                                f"expected {self.dim}")
            ids = shard["global_ids"].to(self.device)
            if len(self) == 0:
                continue
            pos = torch.searchsorted(self._sorted_ids, ids).clamp(max=len(self) - 1)
            mine = self._sorted_ids[pos] == ids
            local = self._order[pos[mine]]
            self.rows[local] = shard["rows"].to(self.device)[mine].to(self.dtype)
            have[local] = True
        self._sums = None if sums is None else sums.to(self.device, self._work_dtype)
        if not bool(have.all()):
            missing = self.global_ids[~have][:5].tolist()
            raise ReidError(f"memory checkpoint {directory}: {int((~have).sum())} of this rank's rows are missing "
                            f"(e.g. global ids {missing}), expected every training row to be saved")
