"""GaP: scheduled grow-and-prune training (Ma et al., ICLR 2022).

The prunable layers are cut into K contiguous partitions. Every layer starts
pruned to its target (magnitude, from the given weights). Then:

- S-GaP (:class:`SGaP`): partitions are grown one at a time, round-robin: the
  grown partition trains dense (its pruned weights restart from 0.0) while the
  others stay masked, for ``epochs_per_step`` epochs; it is then pruned back to
  its target and the next one is grown. ``rounds`` passes over the K partitions,
  then ``finetune_epochs`` with every mask frozen.
- P-GaP (:class:`PGaP`): in each round, K workers start from the same sparse
  model and each grows a different partition; worker k trains, prunes partition k
  back, and the round ends by merging: partition k's layers (weight and bias) and
  masks come from worker k, every other floating parameter/buffer (BatchNorm,
  non-prunable layers) is the mean over the workers. The workers are the ranks of
  ``torch.distributed`` (gloo on CPU, NCCL on GPU; launch with ``torchrun
  --nproc_per_node K``); without a process group the K jobs run one after another
  in this process. Both give the same merged model bit for bit: each job's seed
  depends only on (seed, round, partition), and the merge gathers every worker's
  state and sums it in worker order on every rank.

Targets: unstructured magnitude, N:M (uniform or a ``Scheme``/mapping), 1xN blocks;
uniform or ERK per-layer sparsity (see :mod:`nmkern.methods.masking`).

Checkpoints (``checkpoint_dir``): one file after every phase (initial prune, each
grow/train/prune step or P-GaP worker job, each merge, the final fine-tune). Every
phase is a pure function of (model state, masks, seed, phase index): a fresh SGD
optimizer and a data order drawn from the phase seed. So a run killed after any
checkpoint and resumed ends with the same weights and masks, bit for bit, as an
uninterrupted one. Under torch.distributed rank 0 writes the checkpoints after the
initial prune, each merge and the fine-tune. A checkpoint holds only tensors and plain
containers and is read with ``weights_only=True``: a corrupted or planted file raises a
:class:`~nmkern.checkpoint_io.CheckpointError` naming it (see :mod:`._gap_checkpoint`).
Every P-GaP rank ends with a barrier and ``destroy_process_group`` (:mod:`._gap_dist`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..checkpoint_io import CheckpointError
from ..spec import LayerSpec, Pattern, SpecResolver
from ._gap_checkpoint import CHECKPOINT_VERSION, fix_hint, latest_checkpoint, read_checkpoint, write_checkpoint
from ._gap_dist import _DistContext
from .masking import (
    Distribution,
    MaskSet,
    TrainConfig,
    _parse_enum,
    check_data,
    describe,
    prunable_layers,
    resolve_targets,
    train_masked,
    weight_sparsity,
)

log = logging.getLogger("nmkern.methods.gap")

MIN_PARTITIONS, MAX_PARTITIONS = 2, 6


class GaPMethod(str, enum.Enum):
    SEQUENTIAL = "sgap"
    PARALLEL = "pgap"


def make_partitions(layer_names: Sequence[str], k: int) -> list[list[str]]:
    """Cut ``layer_names`` (model order) into ``k`` contiguous groups whose sizes differ by at most one."""
    op = "make_partitions"
    names = list(layer_names)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{op}: the number of partitions must be an int, got {type(k).__name__}")
    if not MIN_PARTITIONS <= k <= MAX_PARTITIONS:
        raise ValueError(f"{op}: {k} partitions; GaP uses {MIN_PARTITIONS} to {MAX_PARTITIONS} (or pass a list of layer-name lists)")
    if k > len(names):
        raise ValueError(f"{op}: {k} partitions but only {len(names)} prunable layers {names}; use at most {len(names)}")
    base, extra = divmod(len(names), k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(names[start:start + size])
        start += size
    return out


def check_partitions(op: str, partitions, layer_names: Sequence[str]) -> list[list[str]]:
    """An int K (contiguous split) or a user list that covers every layer exactly once."""
    if isinstance(partitions, int) and not isinstance(partitions, bool):
        return make_partitions(layer_names, partitions)
    if isinstance(partitions, (str, bytes)) or not isinstance(partitions, Iterable):
        raise TypeError(f"{op}: partitions must be an int K or a list of lists of layer names, got {type(partitions).__name__}")
    parts = []
    for p in partitions:
        if isinstance(p, str) or not isinstance(p, Iterable):
            raise TypeError(f"{op}: each partition must be a list of layer names, got {p!r}")
        parts.append(list(p))
    if len(parts) < MIN_PARTITIONS:
        raise ValueError(f"{op}: {len(parts)} partition(s); GaP needs at least {MIN_PARTITIONS}")
    if any(not p for p in parts):
        raise ValueError(f"{op}: partition {[i for i, p in enumerate(parts) if not p][0]} is empty")
    flat = [n for p in parts for n in p]
    dup = sorted({n for n in flat if flat.count(n) > 1})
    if dup:
        raise ValueError(f"{op}: layers {dup} appear in more than one partition; each layer belongs to exactly one")
    unknown = [n for n in flat if n not in layer_names]
    if unknown:
        raise ValueError(f"{op}: partitions name layers {unknown} that are not prunable layers {list(layer_names)}")
    missing = [n for n in layer_names if n not in flat]
    if missing:
        raise ValueError(f"{op}: layers {missing} are in no partition; every prunable layer must be in exactly one "
                         f"(leave layers out of training with layers=[...])")
    return parts


@dataclasses.dataclass
class GaPResult:
    model: nn.Module
    masks: dict[str, torch.Tensor]
    partitions: list[list[str]]
    targets: dict[str, LayerSpec]
    history: list[dict]

    def sparsity(self) -> float:
        return weight_sparsity(self.model.get_submodule(k) for k in self.masks)

    def export(self) -> nn.Module:
        """A copy of the model with packed ``SparseLinear``/``SparseConv2d`` for N:M and 1xN targets.

        N:M layers go through :func:`nmkern.sparsify` (their masks are the weights'
        own n-of-m, so packing keeps every trained value); 1xN layers through
        :func:`nmkern.methods.blockprune.export_1xn`. Unstructured sparsity has no packed
        format in nmkern: the trained model keeps masked dense weights.
        """
        import copy

        kinds = {t.pattern for t in self.targets.values()}
        if Pattern.UNSTRUCTURED in kinds:
            raise ValueError("GaPResult.export: unstructured targets have no packed nmkern format; use result.model "
                             "(dense modules with zeroed weights) or train with target='nm' / '1xn'")
        if kinds == {Pattern.BLOCK}:
            from .blockprune import export_1xn

            blocks = {t.block for t in self.targets.values()}
            out = export_1xn(self.model, self.masks, blocks.pop(), self.targets)
            if out is None:
                raise ImportError("GaPResult.export: nmkern.nn (SparseLinear/SparseConv2d) is not available")
            return out
        from ..sparsify import sparsify

        out = copy.deepcopy(self.model)
        sparsify(out, dict(self.targets), pack=True)
        return out


def _phases(method: GaPMethod, k: int, rounds: int) -> list[tuple]:
    phases: list[tuple] = [("init",)]
    for r in range(rounds):
        if method is GaPMethod.SEQUENTIAL:
            phases += [("grow", r, p) for p in range(k)]
        else:
            phases += [("worker", r, p) for p in range(k)] + [("merge", r)]
    return phases + [("finetune",)]


def _phase_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


class _GaPBase:
    method: GaPMethod

    def __init__(
        self,
        *,
        partitions: int | Sequence[Sequence[str]] = 3,
        target: Pattern | str = Pattern.UNSTRUCTURED,
        sparsity: float | Mapping[str, float] | None = None,
        n: int | None = None,
        m: int | None = None,
        scheme: Mapping[str, tuple[int, int]] | None = None,
        block: int | None = None,
        rearrange: bool | Iterable[str] | Mapping[str, bool] = False,
        distribution: Distribution | str = Distribution.UNIFORM,
        layers: Iterable[str] | None = None,
        rounds: int = 1,
        epochs_per_step: int = 1,
        finetune_epochs: int = 1,
        seed: int = 0,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 64,
        loss_fn: Callable | None = None,
    ):
        op = self.method.value
        for name, x, lo in (("rounds", rounds, 1), ("epochs_per_step", epochs_per_step, 1),
                            ("finetune_epochs", finetune_epochs, 0), ("seed", seed, 0)):
            if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                raise ValueError(f"{op}: {name} must be an int >= {lo}, got {x!r}")
        self.cfg = TrainConfig(lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, loss_fn=loss_fn)
        self.cfg.check(op)
        self.partitions_arg = partitions
        self.target_kw = dict(target=target, sparsity=sparsity, n=n, m=m, scheme=scheme, block=block,
                              rearrange=rearrange, distribution=distribution)
        self.layers_arg = None if layers is None else list(layers)
        self.rounds, self.epochs_per_step, self.finetune_epochs, self.seed = rounds, epochs_per_step, finetune_epochs, seed

    # ------------------------------------------------------------------ setup
    def _setup(self, model: nn.Module):
        op = self.method.value
        layers = prunable_layers(op, model, self.layers_arg)
        scheme = self.target_kw["scheme"]
        if isinstance(scheme, Mapping) and self.layers_arg is None:
            # A scheme entry of None (DominoSearch leaves such layers dense) takes the layer out of GaP.
            specs = SpecResolver(scheme, op=op, allowed=[Pattern.NM]).resolve(layers)
            layers = {k: mod for k, mod in layers.items() if specs[k] is None or specs[k].pattern is not Pattern.DENSE}
        targets = resolve_targets(op, layers, **self.target_kw)
        parts = check_partitions(op, self.partitions_arg, list(layers))
        return layers, targets, parts

    def _fingerprint(self, parts, targets) -> str:
        return json.dumps({
            "version": CHECKPOINT_VERSION, "method": self.method.value, "partitions": parts,
            "targets": {k: describe(t) for k, t in targets.items()}, "rounds": self.rounds,
            "epochs_per_step": self.epochs_per_step, "finetune_epochs": self.finetune_epochs, "seed": self.seed,
            "train": {k: getattr(self.cfg, k) for k in ("lr", "momentum", "weight_decay", "batch_size")},
        }, sort_keys=True)

    # ------------------------------------------------------------------ phases
    def _log_sparsity(self, history, label, model, parts, masks: MaskSet, loss=None):
        per_part = [weight_sparsity(masks.layers[k] for k in p) for p in parts]
        entry = {"phase": label, "partition_sparsity": per_part,
                 "overall_sparsity": weight_sparsity(masks.layers.values())}
        if loss is not None:
            entry["train_loss"] = loss
        history.append(entry)
        log.info("%s %s: sparsity per partition %s (overall %.4f)", self.method.value, label,
                 " ".join(f"p{i}={s:.4f}" for i, s in enumerate(per_part)), entry["overall_sparsity"])

    def _grow_train_prune(self, model, data, masks, targets, parts, part, seed, label, callback, progress):
        """Grow partition ``part`` dense, train, prune it back; returns the last training loss."""
        for k in parts[part]:
            masks.set(k, None)
        loss = train_masked(model, masks, data, self.epochs_per_step, seed=seed, cfg=self.cfg,
                            desc=f"{self.method.value} {label}", progress=progress)
        if callback:
            callback("grown", {"phase": label, "partition": part, "model": model, "masks": masks.state(),
                               "targets": targets, "partitions": parts})
        masks.prune_(parts[part], targets)
        if callback:
            callback("pruned", {"phase": label, "partition": part, "model": model, "masks": masks.state(),
                                "targets": targets, "partitions": parts})
        return loss

    def run(self, model: nn.Module, data, *, checkpoint_dir: str | None = None, resume: bool = True,
            callback: Callable[[str, dict], None] | None = None, progress: bool = True) -> GaPResult:
        """Train ``model`` in place on ``data`` (an (inputs, labels) pair or a Dataset); returns a :class:`GaPResult`.

        ``callback(event, info)`` is called with events ``"grown"`` (after a grow
        phase's training, before its prune), ``"pruned"`` and ``"checkpoint"``
        (info has ``path`` and ``index``).
        """
        op = self.method.value
        check_data(op, data)
        layers, targets, parts = self._setup(model)
        dist_ctx = _DistContext.create(op, len(parts)) if self.method is GaPMethod.PARALLEL else _DistContext(None)
        run = _Run(model=model, data=data, layers=layers, targets=targets, parts=parts,
                   phases=_phases(self.method, len(parts), self.rounds), masks=MaskSet(layers),
                   fingerprint=self._fingerprint(parts, targets), dist=dist_ctx, checkpoint_dir=checkpoint_dir,
                   callback=callback, progress=progress)
        ok = False
        try:
            index = self._resume(run, resume)
            run.dist.sync_model(model)  # every rank starts from rank 0's weights
            while index < len(run.phases):
                index = self._run_phase(run, index) + 1
            ok = True
        finally:
            dist_ctx.close(ok)  # barrier after the last collective, then destroy the group P-GaP created
        return GaPResult(model=model, masks={k: mk for k, mk in run.masks.state().items()}, partitions=parts,
                         targets=targets, history=run.history)

    def _resume(self, run: "_Run", resume: bool) -> int:
        """Load the latest checkpoint (rank 0 reads, every rank gets it); the index of the next phase."""
        ck, path, error = None, None, None
        if run.checkpoint_dir and resume and run.dist.is_writer:
            path = latest_checkpoint(run.checkpoint_dir)
            if path is not None:
                try:  # weights_only=True: a planted pickle is refused, never run
                    ck = read_checkpoint(path)
                except CheckpointError as e:
                    error = str(e)
        # Every rank resumes from what rank 0 read (checkpoint_dir need not be shared), or raises its error.
        ck, path, error = run.dist.broadcast_object((ck, path, error))
        if error is not None:
            raise CheckpointError(f"{self.method.value}: {error}")
        if ck is None:
            return 0
        if ck["fingerprint"] != run.fingerprint:
            raise ValueError(
                f"{self.method.value}: checkpoint {path} was written by a run with a different configuration; "
                f"use another checkpoint_dir or resume=False to start over"
            )
        self._load_checkpoint(run, path, ck)
        log.info("%s: resuming from %s at phase %d/%d", self.method.value, path, ck["next"], len(run.phases))
        return ck["next"]

    def _load_checkpoint(self, run: "_Run", path: str, ck: dict) -> None:
        op = self.method.value
        if ck["next"] > len(run.phases):
            raise CheckpointError(f"{op}: checkpoint {path} resumes at phase {ck['next']} of a {len(run.phases)}-phase "
                                  f"run; {fix_hint(path)}")
        if set(ck["masks"]) != set(run.masks.masks) or any(set(j["masks"]) != set(run.masks.masks)
                                                           for j in ck["pending"].values()):
            raise CheckpointError(f"{op}: checkpoint {path} has masks for layers {sorted(ck['masks'])}, this run "
                                  f"prunes {sorted(run.masks.masks)}; {fix_hint(path)}")
        for masks in [ck["masks"], *(j["masks"] for j in ck["pending"].values())]:
            for k, mk in masks.items():
                if mk is not None and (mk.dtype != torch.bool or mk.shape != run.layers[k].weight.shape):
                    raise CheckpointError(f"{op}: checkpoint {path} has a {mk.dtype} mask of shape {tuple(mk.shape)} "
                                          f"for layer {k!r} (weight {tuple(run.layers[k].weight.shape)}); "
                                          f"{fix_hint(path)}")
        try:
            run.model.load_state_dict(ck["model"])
            run.masks.load(ck["masks"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{op}: checkpoint {path} does not fit this model ({e}); {fix_hint(path)}") from e
        run.history, run.pending = ck["history"], ck["pending"]

    def _checkpoint(self, run: "_Run", index: int) -> None:
        if not run.checkpoint_dir or not run.dist.is_writer:
            return
        path = write_checkpoint(run.checkpoint_dir, index, {
            "fingerprint": run.fingerprint, "next": index + 1, "model": _clone_state(run.model),
            "masks": run.masks.state(), "history": run.history, "pending": run.pending,
        })
        if run.callback:
            run.callback("checkpoint", {"path": path, "index": index, "phase": run.phases[index]})

    def _run_phase(self, run: "_Run", index: int) -> int:
        """Run phase ``index`` (a P-GaP round: all its worker jobs and the merge); the index of the last phase run."""
        phase = run.phases[index]
        seed = _phase_seed(self.seed, index)
        kind = phase[0]
        if kind in ("worker", "merge"):
            return self._run_round(run, index)
        if kind == "init":
            run.masks.prune_(run.layers, run.targets)
            label, loss = "init", None
        elif kind == "grow":
            _, r, p = phase
            label = f"round {r} grow p{p}"
            loss = self._grow_train_prune(run.model, run.data, run.masks, run.targets, run.parts, p, seed, label,
                                          run.callback, run.progress)
        else:  # finetune: rank 0 trains, everyone gets its weights
            label, loss = "finetune", float("nan")
            if run.dist.is_writer:
                loss = train_masked(run.model, run.masks, run.data, self.finetune_epochs, seed=seed, cfg=self.cfg,
                                    desc=f"{self.method.value} finetune", progress=run.progress)
            run.dist.sync_model(run.model)
        self._log_sparsity(run.history, label, run.model, run.parts, run.masks, loss)
        self._checkpoint(run, index)
        return index

    def _run_round(self, run: "_Run", index: int) -> int:
        """All worker jobs of a P-GaP round, then the merge; a resumed run can land on any of them."""
        phase, k = run.phases[index], len(run.parts)
        r = phase[1]
        first = index - (phase[2] if phase[0] == "worker" else k)  # > index - k when resuming mid-round
        base_state, base_masks = _clone_state(run.model), run.masks.state()
        for p in range(k):
            job = first + p
            if p in run.pending or not run.dist.runs_job(p):
                continue
            loss = self._grow_train_prune(run.model, run.data, run.masks, run.targets, run.parts, p,
                                          _phase_seed(self.seed, job), f"round {r} worker p{p}", run.callback,
                                          run.progress)
            run.pending[p] = {"state": _clone_state(run.model), "masks": run.masks.state(), "loss": loss}
            run.model.load_state_dict(base_state)  # the next job starts from the round's sparse model
            run.masks.load(base_masks)
            if not run.dist.active:
                self._checkpoint(run, job)
        payloads = run.dist.gather_payloads(run.pending, k, run.model, run.masks)
        merged_state, merged_masks = _merge(payloads, run.parts, run.layers, base_state)
        run.model.load_state_dict(merged_state)
        run.masks.load(merged_masks)
        run.masks.apply_()
        for p in range(k):
            run.history.append({"phase": f"round {r} worker p{p}", "train_loss": payloads[p]["loss"]})
        run.pending = {}
        index = first + k  # the merge phase
        self._log_sparsity(run.history, f"round {r} merge", run.model, run.parts, run.masks)
        self._checkpoint(run, index)
        return index


@dataclasses.dataclass
class _Run:
    """One :meth:`_GaPBase.run`: what every phase reads, and the history / pending worker results it writes."""

    model: nn.Module
    data: object
    layers: dict[str, nn.Module]
    targets: dict[str, LayerSpec]
    parts: list[list[str]]
    phases: list[tuple]
    masks: MaskSet
    fingerprint: str
    dist: "_DistContext"
    checkpoint_dir: str | None
    callback: Callable[[str, dict], None] | None
    progress: bool
    history: list[dict] = dataclasses.field(default_factory=list)
    pending: dict[int, dict] = dataclasses.field(default_factory=dict)


class SGaP(_GaPBase):
    """Sequential GaP: grow one partition at a time, round-robin. Configure in the constructor, then :meth:`run`."""

    method = GaPMethod.SEQUENTIAL


class PGaP(_GaPBase):
    """Parallel GaP: K workers (torch.distributed ranks, or sequential jobs) grow different partitions, then merge."""

    method = GaPMethod.PARALLEL


def gap_train(model: nn.Module, data, *, method: GaPMethod | str = GaPMethod.SEQUENTIAL,
              checkpoint_dir: str | None = None, resume: bool = True,
              callback: Callable[[str, dict], None] | None = None, progress: bool = True, **config) -> GaPResult:
    """Run S-GaP (``method="sgap"``) or P-GaP (``"pgap"``) on ``model``; ``config`` goes to :class:`SGaP`/:class:`PGaP`."""
    method = _parse_enum("gap_train", "method", GaPMethod, method)
    cls = SGaP if method is GaPMethod.SEQUENTIAL else PGaP
    return cls(**config).run(model, data, checkpoint_dir=checkpoint_dir, resume=resume, callback=callback,
                             progress=progress)


# ----------------------------------------------------------------------------- merge


def _partition_keys(parts: Sequence[Sequence[str]], state_keys: Iterable[str]) -> dict[str, int]:
    """state_dict key -> partition index for every parameter of a partitioned layer."""
    owner = {}
    for p, names in enumerate(parts):
        for name in names:
            prefix = name + "."
            for key in state_keys:
                if key.startswith(prefix) and "." not in key[len(prefix):]:
                    owner[key] = p
    return owner


def _merge(payloads: Sequence[dict], parts, layers, base_state) -> tuple[dict, dict]:
    """Partition p from worker p; every other floating tensor is the worker mean, summed in worker order."""
    owner = _partition_keys(parts, base_state.keys())
    k = len(payloads)
    state = {}
    for key, base in base_state.items():
        if key in owner:
            state[key] = payloads[owner[key]]["state"][key].clone()
        elif base.is_floating_point():
            acc = payloads[0]["state"][key].clone()
            for p in range(1, k):
                acc += payloads[p]["state"][key]
            state[key] = acc / k
        else:  # integer buffers (BatchNorm's num_batches_tracked): equal across workers
            state[key] = payloads[0]["state"][key].clone()
    masks = {}
    for p, names in enumerate(parts):
        for name in names:
            masks[name] = payloads[p]["masks"][name]
    return state, masks
