"""Dispatch decided by measurement: which path a packed layer runs, timed in place and remembered.

Under ``backend="auto"`` the calls of packed layers that meet a new (shape, pattern, dtype,
device, row bucket) take every path that can run them in turn (dense and, on the CPU, nmkern's
native kernel; on a GPU cuBLAS dense, cuSPARSELt, the CUDA 2:4 kernel and Triton), each call
timed: :data:`SAMPLES` samples per path, interleaved, then the medians decide (:class:`Trial`).
The samples are the model's own calls, so they see the cache and the threads as the model leaves
them, not as a loop over one layer would. A sparse path is taken only when its median beats
dense by at least :data:`MIN_GAIN` (3%); otherwise dense.

The winner is remembered for the process and written to a small JSON file in the user cache
folder (``$NMKERN_CACHE_DIR``, else ``~/.cache/nmkern``; an empty ``NMKERN_CACHE_DIR`` keeps it in
memory only). The file's name and header carry the machine (CPU model, flags, nmkern's CPU
library build and a hash of its file; or GPU name, capability and driver), torch's and nmkern's versions: a file
written elsewhere, or one that does not parse, is ignored with a warning and rewritten.

The key holds the cache state too: a model whose weights fit in the last-level cache reads them
from the cache every forward, one that does not reads them from memory, and the winner can flip
(measured here, 2048x2048 fp32 2:4 at batch 1: dense 0.50 ms in cache but 7.9 ms per layer in a
stack of 40, nmkern's CPU kernel 0.77 / 1.39 ms). So a winner is recorded under ``cold`` when
the dense bytes of the packed layers alive on that device (:func:`tune`: of the model) exceed the
last-level cache, else under ``warm``.

Row buckets are powers of two: a call with ``rows`` GEMM rows uses the bucket of the smallest
power of two >= rows (capped at 65536), so a model meeting batch 1, 16 and 256 measures three times
per distinct layer shape, not once per layer or per batch.

``NMKERN_TUNE=0`` turns measuring off: ``auto`` then follows the static rules of
:mod:`nmkern.dispatch`, and recorded winners are not read either. ``NMKERN_BACKEND`` and a
forced ``backend=`` are obeyed before any of this.

:func:`tune` runs a model until every layer is decided (``nmkern tune`` on the command line) and
returns the per-layer table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from . import dispatch, timing
from .data import cache_dir  # the one reader of NMKERN_CACHE_DIR (datasets use it too)
from .backend import Backend, env_backend, parse_backend
from .dispatch import Call
from .memory import release_free_memory
from .spec import Pattern

ENV_TUNE = "NMKERN_TUNE"
ENV_CACHE_DIR = "NMKERN_CACHE_DIR"
# A sparse path must beat dense by this fraction of dense's median: timing noise on a shared
# 2-core machine is ~1-2% between medians of the same op, and a near-tie is not worth a second form.
MIN_GAIN = 0.03
MAX_BUCKET = 1 << 16
CACHE_FORMAT = 1
# What a sample times, in the cache file's fingerprint: winners timed another way are measured again. 2: a
# linear's CPU kernel called as its bound calls run it (1 timed the checked op, ~20 us a call more). 3: fp16
# 2:4 / 1:4 from 8 rows on the AMX kernel (dense won those rows against the FMA kernels), and the large-batch
# kernels' column-by-column stores (2:4 fp32 1536x384 at 32 rows, 2 threads: 1.43 -> 0.73x dense).
MEASUREMENT = 3
# Timed calls per candidate path before a decision (their median decides), taken in blocks of BLOCK
# consecutive calls of one path whose first call is not counted (see Trial).
SAMPLES = 7
BLOCK = 3
# tune(): forward passes per example input at most, to finish every measurement.
MAX_TUNE_PASSES = 64
# The paths timed against each other, per device type (dense first: the baseline).
CANDIDATES = {
    "cpu": (Backend.DENSE, Backend.CPU),
    "cuda": (Backend.DENSE, Backend.CUSPARSELT, Backend.CUDA, Backend.TRITON),
}


class Source:
    """Where a decision came from (the ``source`` column of :class:`TuneReport`)."""

    MEASURED = "measured"  # timed now
    CACHE = "cache"  # timed before: this process or the cache file
    STATIC = "static"  # one candidate only, or NMKERN_TUNE=0: dispatch's static rules
    FORCED = "forced"  # backend= set on the layer
    ENV = "env"  # NMKERN_BACKEND


def enabled() -> bool:
    """False when ``NMKERN_TUNE`` is 0 / false / off / no (measuring and recorded winners off)."""
    text = os.environ.get(ENV_TUNE, "1").strip().lower()
    if text in ("", "1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"nmkern: {ENV_TUNE}={text!r} is not understood; set it to 1 (measure, the default) or 0 "
                     "(static dispatch rules)")


def row_bucket(rows: int) -> int:
    """The power of two >= ``rows`` (at least 1, at most :data:`MAX_BUCKET`)."""
    return min(MAX_BUCKET, 1 << max(0, int(rows) - 1).bit_length())


# --------------------------------------------------------------------------- warm or cold

_packed_layers: weakref.WeakSet = weakref.WeakSet()
_working_set: dict = {"generation": 0, "computed": -1, "bytes": {}}
_llc: dict[str, int] = {}
_state_override = threading.local()  # tune(model): the model's own weight bytes


def note_packed(layer) -> None:
    """A packed layer exists (``pack()``, ``load_state_dict``, ``.to()``): it counts toward the working set."""
    _packed_layers.add(layer)
    _working_set["generation"] += 1


def _dense_bytes(layer) -> int:
    info = layer._layer_info()
    return info.out_features * info.in_features * info.dtype.itemsize


def working_set_bytes(device: str) -> int:
    """Dense bytes of the packed layers alive on ``device`` (what a model reads per forward, if all ran dense)."""
    override = getattr(_state_override, "bytes", None)
    if override is not None:
        return override
    if _working_set["computed"] != _working_set["generation"]:
        totals: dict[str, int] = {}
        for layer in list(_packed_layers):
            if layer.is_packed:
                dev = layer.device.type
                totals[dev] = totals.get(dev, 0) + _dense_bytes(layer)
        _working_set.update(computed=_working_set["generation"], bytes=totals)
    return _working_set["bytes"].get(device, 0)


def cache_state(device: str) -> str:
    """"cold" when the working set exceeds the device's last-level cache, else "warm"."""
    if device not in _llc:
        _llc[device] = timing.last_level_cache_bytes(device)
    return "cold" if working_set_bytes(device) > _llc[device] else "warm"


def key_of(call: Call) -> str:
    """The cache key of a call: op, pattern, GEMM shape, conv geometry, dtype, device, threads, cache state,
    row bucket."""
    layer = call.layer
    pattern = f"{layer.n}:{layer.m}" if layer.pattern is Pattern.NM else f"1x{layer.block}@{layer.sparsity:g}"
    geometry = "".join(f"/{g}" for g in layer.geometry)
    threads = f"|t{torch.get_num_threads()}" if call.device == "cpu" else ""
    dtype = str(layer.dtype).replace("torch.", "")
    return (f"{layer.op.value}|{pattern}|{layer.out_features}x{layer.in_features}{geometry}|{dtype}|{call.device}"
            f"{threads}|{cache_state(call.device)}|r{row_bucket(call.rows)}")


@dataclasses.dataclass(frozen=True)
class Decision:
    """The path a call takes, and the medians it was decided on (milliseconds per path; empty when not timed)."""

    path: Backend
    medians_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)
    source: str = Source.MEASURED

    def to_json(self) -> dict:
        return {"path": self.path.value, "medians_ms": dict(self.medians_ms)}


# --------------------------------------------------------------------------- the cache file


def _fingerprint(device: str) -> dict:
    """What a timing depends on besides the layer: the machine, torch, nmkern and, on the CPU, the build of
    nmkern's kernel library loaded (:func:`nmkern._cpu.library_id`)."""
    from . import __version__

    machine: dict = {"device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        machine.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        try:  # not a public API; unverified without a GPU here
            machine["driver"] = int(torch._C._cuda_getDriverVersion())
        except (AttributeError, RuntimeError):
            machine["driver"] = None
    else:
        machine.update(cpu=timing.cpu_name(), flags=timing.cpu_flags(), isa=timing._nmkern_cpu_isa(),
                       library=timing._nmkern_cpu_library())
    return {"machine": machine, "torch": torch.__version__, "nmkern": __version__, "measurement": MEASUREMENT}


class DispatchCache:
    """Measured winners of one device type: in memory, mirrored to one JSON file (see the module docstring)."""

    def __init__(self, directory: Path | None, device: str):
        self.device = device
        self.fingerprint = _fingerprint(device)
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.path = None if directory is None else directory / f"dispatch-{device}-{digest}.json"
        self.entries: dict[str, Decision] = {}
        self._write_failed = False
        self._read()

    def _read(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
                raise ValueError(f"not an nmkern dispatch cache of format {CACHE_FORMAT}")
            if doc.get("fingerprint") != self.fingerprint:
                raise ValueError("it was written for another machine, torch or nmkern version")
            entries = {str(k): Decision(Backend(e["path"]), {str(p): float(t) for p, t in e["medians_ms"].items()},
                                        Source.CACHE) for k, e in doc["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            warnings.warn(f"nmkern: ignoring the dispatch cache {self.path} ({e}); it will be rewritten",
                          RuntimeWarning, stacklevel=2)
            self._write()  # replace the unusable file now, so the warning is not repeated next process
            return
        self.entries = entries

    def get(self, key: str) -> Decision | None:
        return self.entries.get(key)

    def put(self, key: str, decision: Decision) -> None:
        self.entries[key] = dataclasses.replace(decision, source=Source.CACHE)
        self._write()

    def _write(self) -> None:
        """Write the whole table atomically (a temporary file renamed over the old one); a failure warns once."""
        if self.path is None or self._write_failed:
            return
        doc = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint,
               "entries": {k: d.to_json() for k, d in sorted(self.entries.items())}}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, self.path)
        except OSError as e:
            self._write_failed = True
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # the folder itself is not there (a file in its path)
                pass
            warnings.warn(f"nmkern: cannot write the dispatch cache {self.path} ({e}); measured paths are kept in "
                          f"memory for this process only (set {ENV_CACHE_DIR} to a writable folder)",
                          RuntimeWarning, stacklevel=2)


_lock = threading.Lock()
_caches: dict[tuple[str, str | None], DispatchCache] = {}


def dispatch_cache(device: str) -> DispatchCache:
    """The process's cache for ``device`` ("cpu", "cuda") under the current cache folder."""
    directory = cache_dir()
    key = (device, None if directory is None else str(directory))
    cache = _caches.get(key)
    if cache is None:
        with _lock:
            cache = _caches.get(key)
            if cache is None:
                cache = _caches[key] = DispatchCache(directory, device)
    return cache


def forget() -> None:
    """Drop every in-memory table (files stay): the next decision reads the cache file again (tests, tune)."""
    with _lock:
        _caches.clear()


# --------------------------------------------------------------------------- deciding


def candidates(call: Call) -> list[Backend]:
    """The paths timed for ``call``: :data:`CANDIDATES` of its device that can run it (dense always can)."""
    return [p for p in CANDIDATES.get(call.device, (Backend.DENSE,)) if dispatch.why_not(p, call) is None]


def lookup(call: Call) -> Backend | None:
    """The recorded winner of ``call`` (None: none recorded, tuning off, or it cannot run the call now)."""
    if call.device not in CANDIDATES or not enabled():
        return None
    decision = dispatch_cache(call.device).get(key_of(call))
    if decision is None or dispatch.why_not(decision.path, call) is not None:
        return None
    return decision.path


def pick(medians: Mapping[Backend, float]) -> Backend:
    """Dense, unless the fastest sparse path's median is at least :data:`MIN_GAIN` below dense's."""
    dense = medians[Backend.DENSE]
    sparse = [(t, p) for p, t in medians.items() if p is not Backend.DENSE]
    if sparse:
        best_time, best = min(sparse, key=lambda tp: tp[0])
        if best_time <= (1.0 - MIN_GAIN) * dense:
            return best
    return Backend.DENSE


# The clock around each measured call, and what a sample records of it (tests swap _observe for a fake timer).
_clock: Callable[[], float] = time.perf_counter
_observe: Callable[[Backend, float], float] = lambda path, seconds: seconds  # noqa: E731


class Trial:
    """One key's measurement in progress, made of the model's own calls.

    Calls with this key take the candidate paths in blocks of :data:`BLOCK` calls, the path with the
    fewest samples next (rotating on ties), each call timed around itself: in place, so the weight is
    as cold or warm, and the threads as awake, as the model leaves them. The first call of a block is
    not counted: a switch of path pays for the previous path's threads (torch's OpenMP workers spin
    for a while after a dense call and share the 2 cores with nmkern's kernel threads: measured here,
    4096x4096 2:4 fp32 at batch 1, nmkern's kernel 4.0 ms median right after dense calls against 2.0 ms
    after its own). Nor is the first call of a path on each layer (it builds that path's weight form).
    Layers sharing the key pool their samples.
    """

    def __init__(self, key: str, paths: list[Backend]):
        self.key, self.paths = key, list(paths)
        self.samples: dict[Backend, list[float]] = {p: [] for p in self.paths}
        self.warmed: set[tuple[int, Backend]] = set()
        self.turn = 0
        self.current: Backend | None = None
        self.left = 0  # calls left in the current block

    def next_path(self) -> Backend:
        if self.left == 0:
            fewest = min(len(v) for v in self.samples.values())
            k = self.turn % len(self.paths)
            self.turn += 1
            self.current = next(p for p in self.paths[k:] + self.paths[:k] if len(self.samples[p]) == fewest)
            self.left = BLOCK
        self.left -= 1
        return self.current

    def done(self) -> bool:
        return all(len(v) >= SAMPLES for v in self.samples.values())

    def decision(self) -> Decision:
        medians = {p: statistics.median(v) for p, v in self.samples.items()}
        return Decision(pick(medians), {p.value: round(t * 1e3, 6) for p, t in medians.items()}, Source.MEASURED)

    def run(self, path: Backend, fn: Callable, layer, x: torch.Tensor) -> torch.Tensor:
        """``fn(layer, x)``, timed; the sample is kept unless it opens a block or is the path's first on ``layer``."""
        opens_block = self.left == BLOCK - 1
        sync = timing.device_sync(x.device)
        if sync is not None:
            sync()
        t0 = _clock()
        y = fn(layer, x)
        if sync is not None:
            sync()
        seconds = _clock() - t0
        if (id(layer), path) not in self.warmed:
            self.warmed.add((id(layer), path))
        elif not opens_block:
            self.samples[path].append(_observe(path, seconds))
        return y


_trials: dict[str, Trial] = {}
# tune() sets these: the keys decided during this tune, re-measuring even recorded ones (force), and the
# keys still measuring in the current pass.
_tuning = threading.local()


def decide(layer, call: Call) -> Decision | Trial:
    """How a packed layer runs ``call``: forced / ``NMKERN_BACKEND`` / recorded / static, or the :class:`Trial`
    measuring it (then the caller runs ``trial.next_path()`` through ``trial.run``)."""
    requested = parse_backend(f"nmkern.{call.layer.op.value}", layer.backend)
    if requested is not Backend.AUTO:
        return Decision(dispatch.choose(requested, call), source=Source.FORCED)
    env = env_backend(f"nmkern.{call.layer.op.value}")
    if env is not None and dispatch.why_not(env, call) is None:
        return Decision(env, source=Source.ENV)
    paths = candidates(call)
    if len(paths) < 2 or not enabled() or torch.compiler.is_compiling():
        return Decision(dispatch.choose(Backend.AUTO, call), source=Source.STATIC)
    key, cache = key_of(call), dispatch_cache(call.device)
    fresh = getattr(_tuning, "fresh", None)
    recorded = cache.get(key)
    if recorded is not None and recorded.path in paths and not (getattr(_tuning, "force", False) and key not in fresh):
        return recorded
    trial = _trials.get(key)
    if trial is None or trial.paths != paths:
        trial = _trials[key] = Trial(key, paths)
    if not trial.done():
        pending = getattr(_tuning, "pending", None)
        if pending is not None:
            pending.add(key)
        return trial
    del _trials[key]
    decision = trial.decision()
    cache.put(key, decision)
    if fresh is not None:
        fresh.add(key)
    return decision


# --------------------------------------------------------------------------- a whole model


@dataclasses.dataclass
class TuneReport:
    """What :func:`tune` decided: one row per (layer, GEMM rows) met, and the cache file it wrote."""

    rows: list[dict]
    cache_file: str | None

    def table(self) -> str:
        """A markdown table: layer, rows, path, source, dense and sparse medians, sparse/dense."""
        head = "| layer | shape | pattern | dtype | rows | path | source | dense ms | best sparse ms | sparse/dense |"
        out = [head, "|" + "---|" * 10]
        for r in self.rows:
            ratio = "" if r["sparse_ratio"] is None else f"{r['sparse_ratio']:.2f}"
            dense = "" if r["dense_ms"] is None else f"{r['dense_ms']:.4f}"
            sparse = "" if r["best_sparse_ms"] is None else f"{r['best_sparse_ms']:.4f}"
            out.append(f"| {r['layer']} | {r['shape']} | {r['pattern']} | {r['dtype']} | {r['rows']} | {r['path']} "
                       f"| {r['source']} | {dense} | {sparse} | {ratio} |")
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "cache_file": self.cache_file}


def _report_row(name: str, call: Call, decision: Decision) -> dict:
    layer = call.layer
    medians = dict(decision.medians_ms)
    dense = medians.get(Backend.DENSE.value)
    sparse = [t for p, t in medians.items() if p != Backend.DENSE.value]
    best = min(sparse) if sparse else None
    return {"layer": name, "op": layer.op.value, "shape": f"{layer.out_features}x{layer.in_features}",
            "pattern": f"{layer.n}:{layer.m}" if layer.pattern is Pattern.NM else f"1x{layer.block}@{layer.sparsity:g}",
            "dtype": str(layer.dtype).replace("torch.", ""), "device": call.device, "rows": call.rows,
            "bucket": row_bucket(call.rows), "path": decision.path.value, "source": decision.source,
            "medians_ms": medians, "dense_ms": dense, "best_sparse_ms": best,
            "sparse_ratio": None if dense is None or best is None or dense <= 0 else round(best / dense, 4)}


_recording = threading.local()


def record(layer, call: Call, decision: Decision) -> None:
    """Called by a packed layer for every decision it makes; :func:`tune` collects them."""
    sink = getattr(_recording, "sink", None)
    if sink is not None:
        sink.append((layer, call, decision))


def _forward(op: str, model: torch.nn.Module, inputs) -> None:
    if isinstance(inputs, torch.Tensor):
        model(inputs)
    elif isinstance(inputs, tuple):
        model(*inputs)
    elif isinstance(inputs, dict):
        model(**inputs)
    else:
        raise TypeError(f"{op}: each example input must be a tensor, a tuple of args or a dict of kwargs, got "
                        f"{type(inputs).__name__}")


def _tune_input(op: str, model: torch.nn.Module, inputs, layers: list) -> None:
    """Forward ``inputs`` until no layer is measuring any more."""
    for _ in range(MAX_TUNE_PASSES):
        for layer in layers:  # every layer decides afresh (a bound dense op would skip the decision)
            layer._forget_decisions()
        _tuning.pending = set()
        _forward(op, model, inputs)
        if not _tuning.pending:
            break
    else:
        warnings.warn(f"{op}: {len(_tuning.pending)} measurement(s) not finished after {MAX_TUNE_PASSES} passes; "
                      "they finish during later calls", RuntimeWarning, stacklevel=3)


def _collect(op: str, model: torch.nn.Module, inputs, layers: list, sink: list) -> None:
    """Forward ``inputs`` once more, every layer deciding afresh, into ``sink``: the paths the calls take now (after
    every input was tuned: a later row count can change a layer's resident form, and with it an earlier one's
    path)."""
    for layer in layers:
        layer._forget_decisions()
    _recording.sink = sink
    try:
        _forward(op, model, inputs)
    finally:
        _recording.sink = None


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a forward reads for weights: every parameter and buffer, a packed layer counted as its dense weight."""
    from .nn._layer import _SparseLayer

    total, packed = 0, set()
    for m in model.modules():
        if isinstance(m, _SparseLayer) and m.is_packed:
            total += _dense_bytes(m)
            packed.update(id(t) for t in m.buffers(recurse=False))
    seen = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in packed and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def tune(model: torch.nn.Module, example_inputs, *, force: bool = False) -> TuneReport:
    """Measure, ahead of time, the path every packed layer of ``model`` takes for ``example_inputs``.

    ``example_inputs``: a tensor (``model(x)``), a tuple (``model(*args)``), a dict (``model(**kwargs)``),
    or a list of those (run in turn, e.g. one per batch size). Runs the model under ``torch.no_grad()``;
    each input is run until every packed ``SparseLinear`` / ``SparseConv2d`` has decided its path at that row
    count (a few forward passes: :data:`SAMPLES` timed calls per path, pooled over the layers sharing a shape;
    ``force=True``: re-measure even what is recorded). Returns a :class:`TuneReport` (``source`` "measured":
    timed in this call, "cache": recorded before); the winners are in the cache file, so later processes
    start tuned. Needs ``NMKERN_TUNE`` unset or 1. Winners are keyed ``cold`` when the model's weight bytes
    (:func:`model_weight_bytes`) exceed the last-level cache.
    """
    from .nn._layer import _SparseLayer

    op = "nmkern.tune"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not enabled():
        raise ValueError(f"{op}: {ENV_TUNE}=0 turns measuring off; unset it (or set it to 1) to tune")
    packed = [(name, m) for name, m in model.named_modules() if isinstance(m, _SparseLayer) and m.is_packed]
    if not packed:
        raise ValueError(f"{op}: the model has no packed SparseLinear / SparseConv2d layers; sparsify and pack it "
                         "first (nmkern.sparsify(model, scheme, pack=True))")
    layers = {id(m): name for name, m in packed}
    batches = example_inputs if isinstance(example_inputs, list) else [example_inputs]
    if not batches:
        raise ValueError(f"{op}: example_inputs is an empty list; give a tensor, a tuple of args, a dict of kwargs, "
                         "or a list of those (e.g. one per batch size)")
    sink: list = []
    _tuning.fresh, _tuning.force, _state_override.bytes = set(), bool(force), model_weight_bytes(model)
    try:
        with torch.no_grad():
            for inputs in batches:
                _tune_input(op, model, inputs, [m for _, m in packed])
            for inputs in batches:
                _collect(op, model, inputs, [m for _, m in packed], sink)
        fresh = set(_tuning.fresh)
    finally:
        _tuning.fresh, _tuning.force, _tuning.pending, _state_override.bytes = None, False, None, None
        release_free_memory()  # the weight forms built to time the losing paths are gone: their pages too
    sink = [(layer, call, dataclasses.replace(d, source=Source.MEASURED) if key_of(call) in fresh else d)
            for layer, call, d in sink]
    rows = [_report_row(layers[id(layer)], call, d) for layer, call, d in sink if id(layer) in layers]
    files = {str(dispatch_cache(call.device).path) for _, call, _ in sink
             if dispatch_cache(call.device).path is not None}
    return TuneReport(rows, next(iter(sorted(files)), None))


__all__ = ["CACHE_FORMAT", "CANDIDATES", "MEASUREMENT", "Decision", "DispatchCache", "ENV_CACHE_DIR", "ENV_TUNE",
           "MIN_GAIN", "BLOCK", "SAMPLES", "Source", "Trial", "TuneReport", "cache_dir", "cache_state", "candidates",
           "decide", "dispatch_cache", "enabled", "forget", "key_of", "lookup", "model_weight_bytes", "note_packed",
           "pick", "row_bucket", "tune", "working_set_bytes"]
