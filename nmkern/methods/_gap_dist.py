"""P-GaP over torch.distributed: which worker jobs a rank runs, how results meet, and a clean shutdown.

:meth:`_DistContext.close` ends every run: on success a barrier (so no rank tears its
connections down while a peer is still inside the last collective, e.g. receiving the
final broadcast), then ``destroy_process_group`` for a group P-GaP created itself, which
joins gloo's worker threads before the process exits. A rank that raised skips the
barrier (its peers are in other collectives) and only destroys its group.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .masking import MaskSet


class _DistContext:
    """Which worker jobs this process runs and how their results meet."""

    def __init__(self, dist_module, owned: bool = False):
        self.dist = dist_module
        self.owned = owned

    @classmethod
    def create(cls, op: str, k: int) -> "_DistContext":
        import torch.distributed as dist

        owned = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)  # env:// from torchrun
            owned = True
        if not (dist.is_available() and dist.is_initialized()):
            return cls(None)
        world = dist.get_world_size()
        if world == 1:
            if owned:
                dist.destroy_process_group()
            return cls(None)
        if world != k:
            if owned:
                dist.destroy_process_group()
            raise ValueError(f"{op}: torch.distributed has {world} ranks but there are {k} partitions; "
                             f"launch with torchrun --nproc_per_node {k} (one worker per partition)")
        if dist.get_backend() == "nccl" and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
        return cls(dist, owned)

    @property
    def active(self) -> bool:
        return self.dist is not None

    @property
    def rank(self) -> int:
        return self.dist.get_rank() if self.active else 0

    @property
    def is_writer(self) -> bool:
        if not self.active:  # S-GaP started on every rank of a torchrun job: only rank 0 writes checkpoints
            return os.environ.get("RANK", "0") == "0"
        return self.rank == 0

    def runs_job(self, p: int) -> bool:
        return not self.active or p == self.rank

    def barrier(self) -> None:
        """Every rank here: all earlier collectives are complete on every rank."""
        if not self.active:
            return
        if self.dist.get_backend() == "nccl":
            self.dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            self.dist.barrier()

    def close(self, ok: bool = True) -> None:
        """End of a run: barrier (``ok``: every rank finished its last collective), then destroy an owned group.

        Without the barrier, rank 0 (the source of the final broadcast) could return, destroy
        its group and exit while a peer is still receiving; the group is destroyed (joining
        gloo's threads) before the interpreter exits. On failure (``ok=False``) the peers are
        in other collectives, so only the group is destroyed; they then fail too and the
        launcher (torchrun) reports every rank's exit.
        """
        if not self.active:
            return
        try:
            if ok:
                self.barrier()
        finally:
            if self.owned and self.dist.is_initialized():
                self.dist.destroy_process_group()
            self.dist = None

    def _device(self, model):
        if self.active and self.dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @staticmethod
    def _float_keys(model):
        # Every state tensor travels as float64: exact for fp32/fp16/bf16 values and for
        # integer buffers below 2**53 (BatchNorm's num_batches_tracked).
        return [k for k, t in model.state_dict().items() if t.is_floating_point() or t.dtype in
                (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)]

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (pickled between the ranks of this job; used once, for what rank 0 read
        from the resume checkpoint: tensors and plain containers, already checked)."""
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_model(self, model: nn.Module) -> None:
        """Broadcast rank 0's state to every rank."""
        if not self.active:
            return
        state = model.state_dict()
        keys = self._float_keys(model)
        flat = torch.cat([state[k].detach().reshape(-1).double() for k in keys]).to(self._device(model))
        self.dist.broadcast(flat, src=0)
        flat = flat.cpu()
        new, offset = {}, 0
        for k in keys:
            t = state[k]
            new[k] = flat[offset:offset + t.numel()].reshape(t.shape).to(t.dtype)
            offset += t.numel()
        model.load_state_dict({**state, **new})

    def gather_payloads(self, pending: dict, k: int, model: nn.Module, masks: MaskSet) -> list[dict]:
        """Every worker's (state, masks, loss), in worker order, on every rank."""
        if not self.active:
            return [pending[p] for p in range(k)]
        mine = pending[self.rank]
        state = mine["state"]
        keys = self._float_keys(model)
        mask_names = list(masks.layers)
        # float64 carries fp32/fp16/bf16 values exactly, so the round trip is bit-exact.
        flat = torch.cat([state[key].reshape(-1).double() for key in keys]
                         + [mine["masks"][n].reshape(-1).double() for n in mask_names]
                         + [torch.tensor([mine["loss"]], dtype=torch.float64)]).to(self._device(model))
        bufs = [torch.empty_like(flat) for _ in range(k)]
        self.dist.all_gather(bufs, flat)
        out = []
        for buf in bufs:
            buf = buf.cpu()
            st, mk, off = dict(state), {}, 0
            for key in keys:
                t = state[key]
                st[key] = buf[off:off + t.numel()].reshape(t.shape).to(t.dtype)
                off += t.numel()
            for n in mask_names:
                ref = mine["masks"][n]
                mk[n] = buf[off:off + ref.numel()].reshape(ref.shape) != 0
                off += ref.numel()
            out.append({"state": st, "masks": mk, "loss": float(buf[off])})
        return out
