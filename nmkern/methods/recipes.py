"""Whole runs on the bundled datasets (what ``nmkern search`` and ``nmkern train`` execute).

* :func:`dense_stage`: the dense starting point (a given state_dict, a finished
  ``DIR/dense.pt``, or trained now);
* :func:`run_search`: DominoSearch a layer-wise N:M scheme from it;
* :func:`run_train`: train the bundled model dense, with SR-STE / STE to a scheme,
  with GaP towards a scheme, or 1xN block-pruned and fine-tuned; resumable.

Schemes are :mod:`nmkern.spec` values: one :class:`~nmkern.spec.LayerSpec` for every
layer, or a Mapping ``{layer name or glob: spec}`` (:class:`~nmkern.Scheme` is one).
Outputs go into one folder and are written atomically. Bad input raises ``ValueError``.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..benchmark import pack_model
from ..data import Dataset
from ..checkpoint_io import atomic_write, describe_load_error, load_into, write_json
from ..spec import BlockSpec, DenseSpec, NMSpec, parse_spec
from . import srste

Log = Callable[[str], None]


class TrainMethod(str, enum.Enum):
    DENSE = "dense"  # the bundled model, dense
    SRSTE = "srste"  # nmkern.sparsify(scheme) + SR-STE (lambda_w = 2e-4)
    STE = "ste"  # the same with plain STE (the ablation)
    GAP = "gap"  # gradual pruning, S-GaP (or P-GaP) towards the scheme
    ONE_BY_N = "1xn"  # 1xN block pruning (L1, rearranged), fine-tuned with frozen masks

    @property
    def takes_scheme(self) -> bool:
        return self in (TrainMethod.SRSTE, TrainMethod.STE, TrainMethod.GAP)


# what run_search / run_train write into their output folder ("gap/": GaP's phase checkpoints)
SEARCH_OUTPUTS = ("dense.pt", "scheme.json", "per_layer_n.png", "search.json")
TRAIN_OUTPUTS = ("checkpoint.pt", "model.pt", "model_packed.pt", "train.json", "gap/")


# --------------------------------------------------------------------------- seeding and RNG state


def seed_everything(seed: int) -> None:
    """Seed torch, Python's ``random`` and numpy (when installed): model initialisation included."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        return
    np.random.seed(seed % 2**32)


def rng_state() -> dict:
    """The RNG states as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    version, mt, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64),
                                                        "gauss": gauss}}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`rng_state` returned (a KeyError / TypeError / ValueError on a malformed one)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["mt"].tolist()), py["gauss"]))
    if "numpy" in state:
        import numpy as np

        npst = state["numpy"]
        np.random.set_state((npst["kind"], npst["keys"].numpy().astype("uint32"), npst["pos"], npst["has_gauss"],
                             npst["cached"]))


# --------------------------------------------------------------------------- a model on a dataset


def train(model: nn.Module, data: Dataset, epochs: int, lr: float, batch_size: int, *, seed: int, desc: str,
          progress: bool = True) -> list[float]:
    """Adam with a cosine learning-rate schedule over ``epochs``; returns the mean loss per epoch."""
    from .loop import train_epochs

    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    out = train_epochs(model, lambda ep: data.train_batches(batch_size, seed=seed * 1000 + ep), opt, epochs=epochs,
                       scheduler=sched, steps_per_epoch=steps_per_epoch, progress=progress, desc=desc)
    return [e.mean for e in out]


def accuracy(model: nn.Module, data: Dataset) -> float:
    """Test-set accuracy (:func:`nmkern.methods.loop.evaluate`)."""
    from .loop import evaluate

    return evaluate(model, data.test_batches())[1]


def prunable_sparsity(model: nn.Module) -> tuple[float, float]:
    """(sparsity of the N:M-capable layers' weights, sparsity of every Linear/Conv weight) of the effective weights.

    "N:M-capable": input features/channels divisible by 16, i.e. the layers DominoSearch
    searches (MNIST1DNet's first conv, 1 input channel, is not one).
    """
    from ..nn import SparseConv2d, SparseLinear

    cap_zero = cap_total = all_zero = all_total = 0
    for _, mod in model.named_modules():
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            w = mod.dense_weight()
        elif isinstance(mod, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            w = mod.weight.detach()
        else:
            continue
        zeros, total = int((w == 0).sum()), w.numel()
        all_zero, all_total = all_zero + zeros, all_total + total
        if w.shape[1] % 16 == 0:
            cap_zero, cap_total = cap_zero + zeros, cap_total + total
    return cap_zero / max(1, cap_total), all_zero / max(1, all_total)


def sparsify_copy(dense: nn.Module, scheme) -> tuple[nn.Module, dict]:
    model = copy.deepcopy(dense)
    from ..sparsify import sparsify

    report = sparsify(model, scheme)
    return model, report.to_dict()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every run on a bundled dataset shares. ``init``: a state_dict of the bundled model to start from."""

    dataset: str = "mnist1d"
    init: str | None = None
    seed: int = 0
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class SearchConfig(RunConfig):
    """DominoSearch options (see :func:`nmkern.methods.domino.domino_search`); ``budget`` a domino ``Budget``."""

    budget: object = None
    m: int = 16
    policy: str = "fixed_m"
    dense_epochs: int = 30
    lr: float = 0.01
    decay: float = 0.5
    decay_milestones: tuple[int, ...] = (200, 400, 600, 800, 1000, 1200)
    check_every: int = 10
    max_iters: int = 10000


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """``scheme``: the scheme as the user wrote it (recorded; :func:`run_train` takes the parsed one)."""

    method: str = "srste"
    scheme: str | None = None
    block: int = 4
    sparsity: float = 0.5
    epochs: int = 10
    lr: float = 1e-3
    gap_method: str = "sgap"
    partitions: int = 2

    def fingerprint(self) -> dict:
        """The options a resumed run must share with the one that wrote the checkpoint."""
        keys = ("dataset", "method", "scheme", "block", "sparsity", "epochs", "lr", "batch_size", "seed", "init")
        return {k: getattr(self, k) for k in keys}


# --------------------------------------------------------------------------- dense starting point


def load_init(cfg: RunConfig, model: torch.nn.Module) -> None:
    """Load ``cfg.init`` (if any) into the bundled model."""
    if cfg.init:
        load_into(model, cfg.init, f"--init {cfg.init} does not fit the bundled {cfg.dataset} model",
                  f"pass a state_dict saved from nmkern.models.make_model({cfg.dataset!r}) (e.g. nmkern demo's dense.pt)")


def dense_stage(cfg: RunConfig, data, out: Path, epochs: int, *, resume: bool = False, progress: bool = True):
    """``(model, test accuracy, how)``: ``cfg.init``, a finished ``out/dense.pt`` (with resume), or trained now."""
    from ..models import make_model

    seed_everything(cfg.seed)  # before the model is built: --seed fixes its initialisation
    model = make_model(cfg.dataset)
    dense_path = out / "dense.pt"
    if cfg.init:
        load_init(cfg, model)
        how = f"loaded from {cfg.init}"
    elif resume and dense_path.is_file():
        load_into(model, str(dense_path), f"--resume: {dense_path} does not fit the bundled {cfg.dataset} model",
                  f"delete {dense_path} (it is retrained) or use another -o")
        how = f"resumed from {dense_path}"
    else:
        train(model, data, epochs, 3e-3, cfg.batch_size, seed=cfg.seed, desc="dense", progress=progress)
        atomic_write(dense_path, lambda p: torch.save(model.state_dict(), p))
        how = f"trained {epochs} epochs, saved {dense_path}"
    model.eval()
    return model, accuracy(model, data), how


# --------------------------------------------------------------------------- search


def check_search_config(cfg: SearchConfig) -> None:
    """DominoSearch's own argument checks on ``cfg``, run before any training (ValueError / TypeError)."""
    import inspect

    from . import domino

    params = inspect.signature(domino.domino_search).parameters
    fixed = {k: params[k].default for k in ("loss_fn", "momentum", "weight_decay", "decay_gamma", "penalty_every",
                                            "vote_ratio", "w_erk", "w_flops", "tolerance")}
    domino._check_args(cfg.budget, cfg.policy, cfg.m, lr=cfg.lr, decay=cfg.decay,
                       decay_milestones=cfg.decay_milestones, check_every=cfg.check_every, max_iters=cfg.max_iters,
                       progress=False, **fixed)
    if not cfg.init and cfg.dense_epochs < 1:
        raise ValueError(f"dense_epochs={cfg.dense_epochs}: must be >= 1 without an init state_dict")


def run_search(cfg: SearchConfig, data, out: Path, *, resume: bool = False, progress: bool = True,
               log: Log = print):
    """DominoSearch from the dense stage; writes ``scheme.json``, ``per_layer_n.png``, ``search.json`` into ``out``.

    Returns ``(scheme, result)``.
    """
    from .domino import domino_search

    dense, dense_acc, how = dense_stage(cfg, data, out, cfg.dense_epochs, resume=resume, progress=progress)
    log(f"dense model: {how}; test accuracy {100 * dense_acc:.1f}%")
    torch.manual_seed(cfg.seed + 1)
    scheme = domino_search(dense, data.train_batches(cfg.batch_size, seed=cfg.seed + 7), budget=cfg.budget, m=cfg.m,
                           policy=cfg.policy, lr=cfg.lr, decay=cfg.decay, decay_milestones=list(cfg.decay_milestones),
                           check_every=cfg.check_every, max_iters=cfg.max_iters, progress=progress, plot=None)
    oneshot, _ = sparsify_copy(dense, scheme)
    result = {"dataset": cfg.dataset, "budget": cfg.budget.to_dict(), "dense": how, "dense_accuracy": dense_acc,
              "oneshot_accuracy": accuracy(oneshot.eval(), data),
              "oneshot_sparsity": prunable_sparsity(oneshot)[0], "scheme": scheme.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "scheme.json", lambda p: scheme.save(p))
    scheme.plot(out / "per_layer_n.png")
    write_json(out / "search.json", result)
    return scheme, result


# --------------------------------------------------------------------------- train


def to_plain(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every sparse module turned back into nn.Linear / nn.Conv2d holding the masked weight."""
    from ..nn import SparseConv2d, SparseLinear

    plain = copy.deepcopy(model)
    for name, mod in list(plain.named_modules()):
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, child, mod.to_dense())
    return plain


def gap_target(scheme, model: torch.nn.Module, *, label: str | None = None, log: Log = print) -> dict:
    """:func:`nmkern.methods.gap.gap_train` keywords (target, n/m or block/sparsity or scheme, layers) for ``scheme``.

    One spec: every prunable layer whose shape fits it; a Mapping: N:M values under exact layer names.
    ``label`` names the scheme in messages (default: the spec's text).
    """
    from .masking import PRUNABLE_TYPES

    if not isinstance(scheme, Mapping):
        spec = parse_spec(scheme, op="gap", where="scheme", allowed=(NMSpec.pattern, BlockSpec.pattern))
        label = label or str(spec)
        layers = dict((n, mod) for n, mod in model.named_modules() if isinstance(mod, PRUNABLE_TYPES))
        if isinstance(spec, BlockSpec):
            fit = [n for n, mod in layers.items() if mod.weight.shape[0] % spec.block == 0]
            kw = {"target": "1xn", "block": spec.block, "sparsity": spec.sparsity}
        elif isinstance(spec, NMSpec):
            fit = [n for n, mod in layers.items() if mod.weight.shape[1] % spec.m == 0]  # in features / channels
            kw = {"target": "nm", "n": spec.n, "m": spec.m}
        else:
            fit = []
        if not fit:
            raise ValueError(f"--scheme {label}: no layer of the model fits it")
        skipped = sorted(set(layers) - set(fit))
        if skipped:
            log(f"gap: left dense (shape does not fit {label}): {', '.join(skipped)}")
        return kw | {"layers": fit}
    specs = {k: parse_spec(v, op="gap", where=f"scheme[{k!r}]") for k, v in scheme.items()}
    layers = {k: s for k, s in specs.items() if not isinstance(s, DenseSpec)}
    bad = [k for k, s in layers.items() if "*" in k or "?" in k or not isinstance(s, NMSpec)]
    if bad:
        raise ValueError(f"--method gap takes an N:M scheme with exact layer names; not {bad}")
    return {"target": "nm", "scheme": {k: (s.n, s.m) for k, s in layers.items()}, "layers": list(layers)}


_CHECKPOINT_TYPES = {"fingerprint": dict, "epoch": int, "model": dict, "optimizer": dict, "scheduler": dict,
                     "history": list}


def _read_checkpoint(cfg: TrainConfig, ckpt: Path) -> dict:
    """The checked contents of a ``checkpoint.pt`` (tensors and plain containers only: weights_only=True,
    so a planted pickle cannot run code); ValueError saying what is wrong and how to fix it."""
    fix = f"delete {ckpt} to start over, or use another -o"
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not a torch file, or objects weights_only refuses
        raise ValueError(f"--resume: {ckpt} is not a checkpoint nmkern can load safely ({describe_load_error(e)}); "
                         f"{fix}") from None
    if not isinstance(state, dict):
        raise ValueError(f"--resume: {ckpt} holds a {type(state).__name__}, not an nmkern training checkpoint; {fix}")
    for key, typ in _CHECKPOINT_TYPES.items():
        if not isinstance(state.get(key), typ) or isinstance(state.get(key), bool):
            raise ValueError(f"--resume: {ckpt} has no valid {key!r} entry (not an nmkern training checkpoint); {fix}")
    if state["fingerprint"] != cfg.fingerprint():
        raise ValueError(f"--resume: {ckpt} was written by a different run ({state['fingerprint']}); "
                         "use the same options or another -o")
    if not 0 <= state["epoch"] <= cfg.epochs or len(state["history"]) != state["epoch"]:
        raise ValueError(f"--resume: {ckpt} records epoch {state['epoch']} with {len(state['history'])} history "
                         f"entries for a {cfg.epochs}-epoch run; {fix}")
    return state


def _resume_state(cfg: TrainConfig, ckpt: Path, model, opt, sched, log: Log) -> tuple[int, list[dict]]:
    state = _read_checkpoint(cfg, ckpt)
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if "rng" in state:
            set_rng_state(state["rng"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"--resume: {ckpt} does not fit this run ({type(e).__name__}: {detail}); delete it to "
                         "start over, or use another -o") from None
    log(f"--resume: continuing after epoch {state['epoch']} of {cfg.epochs}")
    return state["epoch"], state["history"]


def _train_epochs(cfg: TrainConfig, model, data, out: Path, *, resume: bool, progress: bool, log: Log) -> list[dict]:
    """Adam + cosine schedule over ``cfg.epochs``, a resumable checkpoint after every epoch; the history."""
    from tqdm.auto import tqdm

    ckpt = out / "checkpoint.pt"
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(data.y_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    start, history = 0, []
    if resume and ckpt.is_file():
        start, history = _resume_state(cfg, ckpt, model, opt, sched, log)
    bar = tqdm(range(start, cfg.epochs), desc=f"train {cfg.method}", disable=not progress, initial=start,
               total=cfg.epochs)
    for ep in bar:
        losses = srste.train_srste(model, data.train_batches(cfg.batch_size, seed=cfg.seed * 1000 + ep), opt,
                                   scheduler=sched, progress=False)
        acc = accuracy(model, data)
        history.append({"epoch": ep + 1, "loss": sum(losses) / len(losses), "test_accuracy": acc})
        bar.set_postfix_str(f"loss {history[-1]['loss']:.3f} acc {100 * acc:.1f}%")
        state = {"fingerprint": cfg.fingerprint(), "epoch": ep + 1, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                 "rng": rng_state()}
        atomic_write(ckpt, lambda p, s=state: torch.save(s, p))
    return history


def _train_masked(cfg: TrainConfig, scheme, model, data, out: Path, result: dict, *, resume: bool, progress: bool,
                  log: Log):
    """Dense, or SR-STE / STE to ``scheme`` on sparse modules; the sparse model is also saved packed."""
    from ..sparsify import sparsify

    method = TrainMethod(cfg.method)
    if method != TrainMethod.DENSE:
        rep = sparsify(model, scheme, srste=method == TrainMethod.SRSTE)
        if not rep.swapped:
            raise ValueError(f"--scheme {cfg.scheme}: no layer of the {cfg.dataset} model fits it ({rep})")
        result["sparsify"] = rep.to_dict()
    history = _train_epochs(cfg, model, data, out, resume=resume, progress=progress, log=log)
    if method == TrainMethod.DENSE:
        return model, history
    packed = pack_model(model)
    atomic_write(out / "model_packed.pt", lambda p: torch.save(packed.state_dict(), p))
    return to_plain(model), history


def _train_gap(cfg: TrainConfig, scheme, model, data, out: Path, *, resume: bool, progress: bool, log: Log):
    from .gap import gap_train

    kw = gap_target(scheme, model, label=cfg.scheme, log=log)
    res = gap_train(model, (data.x_train, data.y_train), method=cfg.gap_method, checkpoint_dir=str(out / "gap"),
                    resume=resume, progress=progress, epochs_per_step=cfg.epochs, finetune_epochs=cfg.epochs,
                    partitions=cfg.partitions, seed=cfg.seed, batch_size=cfg.batch_size, **kw)
    return res.model, list(res.history)


def _train_1xn(cfg: TrainConfig, model, data, result: dict, *, progress: bool):
    from .blockprune import prune_1xn

    res = prune_1xn(model, block=cfg.block, sparsity=cfg.sparsity, data=(data.x_train, data.y_train), epochs=cfg.epochs,
                    seed=cfg.seed, batch_size=cfg.batch_size, progress=progress, export=False)
    result["skipped"] = list(res.skipped)
    return res.model, [{"epoch": cfg.epochs, "loss": res.train_loss}]


def run_train(cfg: TrainConfig, scheme, data, out: Path, *, resume: bool = False, progress: bool = True,
              log: Log = print) -> dict | None:
    """Train the bundled ``cfg.dataset`` model by ``cfg.method``; writes ``model.pt`` and ``train.json`` into ``out``.

    ``scheme``: the parsed scheme for srste / ste / gap (None otherwise). Returns the
    result (also in ``train.json``), or None when ``resume`` finds a finished 1xN run.
    """
    from ..models import make_model

    method = TrainMethod(cfg.method)
    seed_everything(cfg.seed)  # before the model is built: --seed fixes its initialisation
    model = make_model(cfg.dataset)
    load_init(cfg, model)
    result: dict = {"dataset": cfg.dataset, "method": method.value, "config": cfg.fingerprint()}
    if method == TrainMethod.GAP:
        final, history = _train_gap(cfg, scheme, model, data, out, resume=resume, progress=progress, log=log)
    elif method == TrainMethod.ONE_BY_N:
        if resume and (out / "model.pt").is_file():
            log(f"--resume: {out / 'model.pt'} holds a finished 1xN run (1xN fine-tuning restarts only as a whole)")
            return None
        final, history = _train_1xn(cfg, model, data, result, progress=progress)
    else:
        final, history = _train_masked(cfg, scheme, model, data, out, result, resume=resume, progress=progress, log=log)
    final.eval()
    acc = accuracy(final, data)
    result.update({"test_accuracy": acc, "sparsity_nm_layers": prunable_sparsity(final)[0],
                   "sparsity_all": prunable_sparsity(final)[1], "history": history})
    atomic_write(out / "model.pt", lambda p: torch.save(final.state_dict(), p))
    write_json(out / "train.json", result)
    return result


__all__ = ["SEARCH_OUTPUTS", "TRAIN_OUTPUTS", "RunConfig", "SearchConfig", "TrainConfig", "TrainMethod",
           "check_search_config", "dense_stage", "gap_target", "load_init", "rng_state", "run_search", "run_train",
           "seed_everything", "set_rng_state", "to_plain"]
