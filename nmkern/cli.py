"""The ``nmkern`` command line.

Exit codes: 0 ok, 2 bad usage or input (the message says what and how to fix),
1 internal error.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
from pathlib import Path

import torch

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2

CANDIDATE_M = (2, 4, 8, 16)
CANDIDATE_BLOCKS = (32, 16, 8, 4, 2)


class UsageError(Exception):
    """Bad user input: reported on stderr, exit code 2."""


# --------------------------------------------------------------------------- inspect


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a state_dict, a dict holding one, a pickled module or TorchScript."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as first:
        try:
            import warnings

            with warnings.catch_warnings():  # "torch.jit.load is deprecated": still the way to read TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = torch.jit.load(str(p), map_location="cpu")
        except Exception:
            raise UsageError(
                f"{path} is not a checkpoint torch can load safely ({type(first).__name__}: {first}); "
                "save a state_dict with torch.save(model.state_dict(), path) or a TorchScript file"
            ) from None
    if isinstance(obj, torch.nn.Module) or hasattr(obj, "state_dict"):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        tensors = {k: t for k, t in obj.items() if isinstance(t, torch.Tensor)}
        if tensors:
            return tensors
    raise UsageError(f"{path} holds no tensors (got {type(obj).__name__}); pass a state_dict checkpoint")


def group_dim(t: torch.Tensor) -> int:
    """Linear weights group along in_features (dim 1 == -1), conv weights along input channels (dim 1)."""
    return 1


def detect_nm(t: torch.Tensor) -> tuple[int, int] | None:
    """The sparsest N:M pattern ``t`` satisfies along its group dim (smallest m among equals), or None."""
    x = t.movedim(group_dim(t), -1)
    best = None
    for m in CANDIDATE_M:
        if x.shape[-1] % m:
            continue
        n = int((x != 0).reshape(-1, m).sum(-1).max())
        if n >= m:
            continue
        n = max(n, 1)
        if best is None or n / m < best[0] / best[1]:
            best = (n, m)
    return best


def detect_1xn(t: torch.Tensor) -> tuple[int, float] | None:
    """Largest block size N whose blocks (N out-channels x 1 in-channel x kernel) are all-zero or all-non-zero."""
    o = t.shape[0]
    nz = (t != 0).reshape(o, t.shape[1], -1)
    for n in CANDIDATE_BLOCKS:
        if o % n or n > o:
            continue
        blocks = nz.reshape(o // n, n, nz.shape[1], nz.shape[2])
        any_nz = blocks.any(dim=(1, 3))
        all_nz = blocks.all(dim=(1, 3))
        zero_blocks = ~any_nz
        if bool((zero_blocks | all_nz).all()) and bool(zero_blocks.any()):
            return n, float(zero_blocks.float().mean())
    return None


def describe_tensor(name: str, t: torch.Tensor) -> dict:
    info = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "pattern": "dense"}
    if t.numel():
        info["sparsity"] = round(1.0 - float((t != 0).float().mean()), 6)
    if t.dim() < 2 or not t.is_floating_point() or t.numel() == 0:
        info["pattern"] = "-"
        return info
    # 1xN first: a block-sparse weight often satisfies some N:M pattern by chance, while a
    # random N:M weight practically never has uniform N x 1 blocks.
    blk = detect_1xn(t)
    if blk is not None:
        info["pattern"] = f"1x{blk[0]}"
        info["block_sparsity"] = round(blk[1], 6)
        return info
    nm = detect_nm(t)
    if nm is not None:
        info["pattern"] = f"{nm[0]}:{nm[1]}"
        return info
    if info.get("sparsity", 0) > 0:
        info["pattern"] = "unstructured"
    return info


def cmd_inspect(args) -> int:
    sd = load_state_dict(args.file)
    rows = [describe_tensor(k, t) for k, t in sd.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    print(f"{'tensor':<{width}}  {'shape':<20} {'dtype':<9} {'sparsity':>8}  pattern")
    for r in rows:
        sp = f"{r['sparsity']:.3f}" if "sparsity" in r else "-"
        pat = r["pattern"] + (f" ({r['block_sparsity']:.0%} blocks zero)" if "block_sparsity" in r else "")
        print(f"{r['name']:<{width}}  {str(tuple(r['shape'])):<20} {r['dtype']:<9} {sp:>8}  {pat}")
    return EXIT_OK


# --------------------------------------------------------------------------- shared helpers (demo, prune, search, train, bench)


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def _atomic_write_bytes(path: Path, write) -> None:
    """``write(tmp_path)`` then rename, so a failure never leaves a half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{id(write)}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=str) + "\n"))


def _check_out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {path}: exists and is not a directory; choose a directory path")
    return out


def _threads(args) -> None:
    """--threads (default 1 for the small bundled models: under contention two OpenMP threads spin,
    measured 25x the CPU time of one per MNIST-1D epoch). main() restores the caller's count."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)


def parse_scheme_arg(text: str):
    """``--scheme`` value: 'n:m', '1xN:<block>:<sparsity>' or a scheme JSON file -> what nmkern.sparsify takes."""
    from .sparsify import parse_layer_pattern

    if text.lower().endswith(".json") or Path(text).is_file():
        p = Path(text)
        if not p.is_file():
            raise UsageError(f"--scheme {text}: no such file (give 'n:m' like 2:4, '1xN:4:0.5', or a scheme JSON file)")
        try:
            obj = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--scheme {text}: not valid JSON ({e})") from None
        from .scheme import Scheme

        if isinstance(obj, dict) and obj.get("format", "").startswith("nmkern.scheme"):
            try:
                return Scheme.from_dict(obj)
            except (ValueError, TypeError) as e:
                raise UsageError(f"--scheme {text}: {e}") from None
        if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
            layers = {k: (tuple(v) if isinstance(v, list) else v) for k, v in obj.items()}
            for k, v in layers.items():
                try:
                    parse_layer_pattern(v, f"scheme[{k!r}]")
                except (ValueError, TypeError) as e:
                    raise UsageError(f"--scheme {text}: {e}") from None
            return layers
        raise UsageError(f"--scheme {text}: expected an nmkern scheme (Scheme.save) or a JSON object "
                         "{layer name or glob: 'n:m' | [n, m] | '1xN:<block>:<sparsity>' | null}")
    try:
        pat = parse_layer_pattern(text, "--scheme")
    except (ValueError, TypeError):
        pat = None
    if pat is None:
        raise UsageError(f"--scheme {text!r} is not a pattern: use 'n:m' with n < m <= 16 (e.g. 2:4, 1:8), "
                         "'1xN:<block>:<sparsity>' (e.g. 1xN:4:0.5) or a scheme JSON file")
    return text


def _import_factory(spec: str):
    import importlib

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"--factory {spec!r}: write it as module:callable (e.g. nmkern.models:MNIST1DNet)")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"--factory {spec!r}: cannot import {mod_name!r} ({e}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--factory {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--factory {spec!r}: {attr!r} is not callable")
    return obj


def _build_from_factory(spec: str, state_dict: dict) -> torch.nn.Module:
    factory = _import_factory(spec)
    try:
        model = factory()
    except Exception as e:
        raise UsageError(f"--factory {spec}: calling it with no arguments failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--factory {spec}: returned {type(model).__name__}, not a torch.nn.Module")
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        detail = " ".join(str(e).split())[:400]
        raise UsageError(f"the checkpoint does not fit the model built by {spec} ({detail}); pass the factory the "
                         "checkpoint was saved from") from None
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(
            f"the checkpoint does not fit the model built by {spec}: missing keys {result.missing_keys[:6]}"
            f"{'...' if len(result.missing_keys) > 6 else ''}, unexpected keys {result.unexpected_keys[:6]}"
            f"{'...' if len(result.unexpected_keys) > 6 else ''}; pass the factory the checkpoint was saved from")
    return model


# --------------------------------------------------------------------------- prune


def _prune_method(args) -> str | None:
    """The uniform 1xN pattern string of --method 1xn:<block>:<sparsity>, or None for magnitude N:M."""
    from .sparsify import parse_layer_pattern

    method = args.method.strip().lower()
    if method == "magnitude":
        if args.scheme is None:
            raise UsageError("--scheme is required with --method magnitude (e.g. --scheme 2:4 or --scheme scheme.json)")
        return None
    parts = method.split(":")
    if parts[0] == "1xn" and len(parts) == 3:
        text = f"1xN:{parts[1]}:{parts[2]}"
        try:
            parse_layer_pattern(text, "--method")
        except (ValueError, TypeError) as e:
            raise UsageError(f"--method {args.method}: {e}") from None
        if args.scheme is not None:
            raise UsageError(f"--method {args.method} prunes every layer to 1xN blocks; drop --scheme "
                             "(or use --method magnitude with an N:M --scheme)")
        return text
    raise UsageError(f"--method {args.method!r}: choose 'magnitude' (N:M by |w|, needs --scheme) or "
                     "'1xn:<block>:<sparsity>' (e.g. 1xn:4:0.5)")


def _prune_module(model: torch.nn.Module, scheme) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Masked weights by layer name (module untouched) and per-layer rows, via nmkern.sparsify on a copy."""
    import copy

    from .sparsify import sparsify

    work = copy.deepcopy(model)
    report = sparsify(work, scheme)
    masked = {}
    rows = []
    for name, pat in report.swapped:
        layer = work.get_submodule(name)  # a SparseLinear / SparseConv2d that sparsify put there
        masked[name] = layer.dense_weight()
        rows.append({"layer": name, "action": "sparsified", "detail": pat,
                     "sparsity": round(float((masked[name] == 0).float().mean()), 6)})
    for name, reason in report.skipped:
        rows.append({"layer": name, "action": "skipped", "detail": reason})
    for key in report.unmatched_keys:
        rows.append({"layer": key, "action": "unmatched", "detail": "scheme key matched no Linear/Conv2d layer"})
    return masked, rows


def _prune_torchscript(model, scheme) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The same on a TorchScript module: Linear/Conv2d submodules found by their original class name."""
    from .dispatch import LayerOp
    from .functional import block_mask_1xn, nm_mask
    from .nn import Pattern, fit_reason
    from .sparsify import _Resolver

    resolver = _Resolver(scheme)
    masked, rows = {}, []
    for name, mod in model.named_modules():
        kind = getattr(mod, "original_name", "")
        if kind not in ("Linear", "Conv2d") or not name:
            continue
        w = mod.weight.detach()
        matched, pat = resolver.lookup(name)
        desc = f"{kind} {tuple(w.shape)}"
        if not matched or pat is None:
            why = "not in the scheme (left dense)" if not matched else "the scheme keeps it dense (None)"
            rows.append({"layer": name, "action": "skipped", "detail": f"{desc}: {why}"})
            continue
        if kind == "Linear":
            reason = fit_reason(LayerOp.LINEAR, w.shape[1], w.shape[0], pat.pattern, pat.n, pat.m, pat.block)
        else:
            groups = int(getattr(mod, "groups", 1))
            reason = fit_reason(LayerOp.CONV2D, w.shape[1] * groups, w.shape[0], pat.pattern, pat.n, pat.m, pat.block,
                                groups)
        if reason:
            rows.append({"layer": name, "action": "skipped", "detail": f"{desc}: {reason}"})
            continue
        if pat.pattern is Pattern.NM:
            keep = nm_mask(w, pat.n, pat.m, dim=1, backend="reference")
        else:
            keep = block_mask_1xn(w, pat.block, pat.sparsity, backend="reference")
        masked[name] = w * keep
        rows.append({"layer": name, "action": "sparsified", "detail": f"{desc} as {pat}",
                     "sparsity": round(float((masked[name] == 0).float().mean()), 6)})
    for key in ([k for k in resolver.table if k not in resolver.used] if resolver.is_mapping else []):
        rows.append({"layer": key, "action": "unmatched", "detail": "scheme key matched no Linear/Conv2d layer"})
    return masked, rows


def _load_torchscript(path: Path):
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        return None


def cmd_prune(args) -> int:
    src = Path(args.model)
    if not src.is_file():
        raise UsageError(f"no such file: {args.model}")
    out = Path(args.output)
    if out.resolve() == src.resolve():
        raise UsageError(f"-o {args.output} would overwrite the input; choose another output path")
    if out.suffix == ".json":
        raise UsageError(f"-o {args.output}: the pruned model is a torch file; the report goes beside it as .json")
    if out.exists() and out.is_dir():
        raise UsageError(f"-o {args.output} is a directory; give a file path such as pruned.pt")
    uniform_1xn = _prune_method(args)
    scheme = uniform_1xn if uniform_1xn is not None else parse_scheme_arg(args.scheme)

    script = None
    if args.factory:
        sd = load_state_dict(args.model)
        model = _build_from_factory(args.factory, sd)
        fmt = "state_dict"
    else:
        script = _load_torchscript(src)
        if script is None:
            try:
                torch.load(src, map_location="cpu", weights_only=True)
                loadable = True
            except Exception:
                loadable = False
            if loadable:
                raise UsageError(f"{args.model} is a state_dict checkpoint: pass --factory module:callable that builds "
                                 "the model it belongs to (e.g. --factory nmkern.models:MNIST1DNet)")
            raise UsageError(f"{args.model} is neither a TorchScript file nor a state_dict torch can load safely")
        model = script
        fmt = "torchscript"

    masked, rows = (_prune_torchscript(script, scheme) if script is not None else _prune_module(model, scheme))
    if not masked:
        reasons = "; ".join(f"{r['layer']}: {r['detail']}" for r in rows) or "the model has no Linear/Conv2d layer"
        raise UsageError(f"nothing to prune in {args.model} with this scheme - every layer was skipped ({reasons})")

    with torch.no_grad():
        for name, w in masked.items():
            _submodule(model, name).weight.copy_(w)

    def write_model(tmp: Path) -> None:
        if script is not None:
            torch.jit.save(script, str(tmp))
        else:
            torch.save(model.state_dict(), tmp)

    report = {"input": str(src), "output": str(out), "format": fmt, "scheme": args.scheme,
              "method": args.method, "layers": rows,
              "sparsified": sum(r["action"] == "sparsified" for r in rows),
              "skipped": sum(r["action"] == "skipped" for r in rows)}
    report_path = out.with_suffix(".json")
    _atomic_write_bytes(out, write_model)
    _write_json(report_path, report)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        width = max(len(r["layer"]) for r in rows)
        for r in rows:
            print(f"{r['action']:<10} {r['layer']:<{width}}  {r['detail']}")
        print(f"wrote {out} ({fmt}, {report['sparsified']} layer(s) pruned, {report['skipped']} skipped) "
              f"and {report_path}")
    return EXIT_OK


def _submodule(model, name: str):
    mod = model  # attribute walk: works for nn.Module and TorchScript modules alike
    for part in name.split("."):
        mod = getattr(mod, part)
    return mod


# --------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from .demo import run_demo

    out = _check_out_dir(args.output)
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    command = "nmkern demo" + (" --quick" if args.quick else "") + (f" -o {args.output}" if args.output != "nmkern-demo"
                                                                     else "")
    res = run_demo(out, quick=args.quick, seed=args.seed, progress=_progress(args), command=command,
                   threads=args.threads)
    print(f"{'model':<24} {'sparsity':>9} {'accuracy':>9}")
    for r in res["accuracy"]:
        print(f"{r['name']:<24} {100 * r['sparsity']:8.1f}% {100 * r['accuracy']:8.1f}%")
    for r in res["latency"]:
        extra = f", cpu kernel {r['packed_cpu_kernel_ratio']:.2f}" if "packed_cpu_kernel_ratio" in r else ""
        print(f"batch {r['batch']:>5}: packed/dense time {r['packed_auto_ratio']:.2f} (auto){extra}")
    print(f"report: {out / 'report.md'} (results.json, scheme.json, *.png) in {res['seconds']['total']:.0f} s")
    return EXIT_OK


# --------------------------------------------------------------------------- search / train on the bundled datasets


def _dataset_and_model(args):
    from .data import load_dataset
    from .models import make_model

    try:
        data = load_dataset(args.dataset, seed=args.seed)
    except ImportError as e:
        raise UsageError(str(e)) from None
    return data, (lambda: make_model(args.dataset))


def _load_init(args, model: torch.nn.Module) -> None:
    if not args.init:
        return
    sd = load_state_dict(args.init)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UsageError(f"--init {args.init} does not fit the bundled {args.dataset} model "
                         f"({' '.join(str(e).split())[:300]})") from None
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(f"--init {args.init} does not fit the bundled {args.dataset} model (missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}); pass a state_dict "
                         f"saved from nmkern.models.make_model({args.dataset!r}) (e.g. nmkern demo's dense.pt)")


def _parse_budget(text: str):
    from .methods.domino import Budget

    key, sep, val = text.partition("=")
    try:
        x = float(val)
    except ValueError:
        x = None
    if not sep or key not in ("params", "flops") or x is None:
        raise UsageError(f"--budget {text!r}: write params=<sparsity> (e.g. params=0.875) or flops=<reduction> "
                         "(e.g. flops=8)")
    try:
        return Budget(**{key: x})
    except (ValueError, TypeError) as e:
        raise UsageError(f"--budget {text}: {e}") from None


def _dense_stage(args, out: Path, data, make, epochs: int):
    """The dense starting point: --init, a finished DIR/dense.pt (with --resume), or trained now."""
    from .demo import accuracy, train

    model = make()
    dense_path = out / "dense.pt"
    if args.init:
        _load_init(args, model)
        how = f"loaded from {args.init}"
    elif args.resume and dense_path.is_file():
        model.load_state_dict(torch.load(dense_path, map_location="cpu", weights_only=True))
        how = f"resumed from {dense_path}"
    else:
        torch.manual_seed(args.seed)
        train(model, data, epochs, 3e-3, args.batch_size, seed=args.seed, desc="dense", progress=_progress(args))
        _atomic_write_bytes(dense_path, lambda p: torch.save(model.state_dict(), p))
        how = f"trained {epochs} epochs, saved {dense_path}"
    model.eval()
    return model, accuracy(model, data), how


def cmd_search(args) -> int:
    from .demo import accuracy, prunable_sparsity, sparsify_copy
    from .methods.domino import domino_search

    out = _check_out_dir(args.output)
    budget = _parse_budget(args.budget)
    _threads(args)
    scheme_path = out / "scheme.json"
    if scheme_path.exists() and not args.resume:
        raise UsageError(f"{scheme_path} exists; pass --resume to keep it (or choose another -o)")
    data, make = _dataset_and_model(args)
    if args.resume and scheme_path.is_file():
        from .scheme import Scheme

        print(f"--resume: {scheme_path} already holds a finished search:\n{Scheme.load(scheme_path)!r}")
        return EXIT_OK
    dense, dense_acc, how = _dense_stage(args, out, data, make, args.dense_epochs)
    print(f"dense model: {how}; test accuracy {100 * dense_acc:.1f}%")
    torch.manual_seed(args.seed + 1)
    scheme = domino_search(dense, data.train_batches(args.batch_size, seed=args.seed + 7), budget=budget, m=args.m,
                           policy=args.policy, lr=args.lr, decay=args.decay, decay_milestones=args.decay_milestones,
                           check_every=args.check_every, max_iters=args.max_iters, progress=_progress(args),
                           plot=None)
    oneshot, _ = sparsify_copy(dense, scheme)
    result = {"dataset": args.dataset, "budget": budget.to_dict(), "dense": how, "dense_accuracy": dense_acc,
              "oneshot_accuracy": accuracy(oneshot.eval(), data), "oneshot_sparsity": prunable_sparsity(oneshot)[0],
              "scheme": scheme.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(scheme_path, lambda p: scheme.save(p))
    scheme.plot(out / "per_layer_n.png")
    _write_json(out / "search.json", result)
    print(repr(scheme))
    print(f"one-shot accuracy of the scheme (no retraining): {100 * result['oneshot_accuracy']:.1f}%")
    print(f"wrote {scheme_path}, {out / 'per_layer_n.png'}, {out / 'search.json'}; retrain it with "
          f"`nmkern train --dataset {args.dataset} --method srste --scheme {scheme_path} --init <dense.pt> -o DIR`")
    return EXIT_OK


class TrainMethod(str, enum.Enum):
    DENSE = "dense"  # the bundled model, dense
    SRSTE = "srste"  # nmkern.sparsify(scheme) + SR-STE (lambda_w = 2e-4)
    STE = "ste"  # the same with plain STE (the ablation)
    GAP = "gap"  # gradual pruning, S-GaP (or P-GaP) towards the scheme
    ONE_BY_N = "1xn"  # 1xN block pruning (L1, rearranged), fine-tuned with frozen masks


def _train_fingerprint(args) -> dict:
    keys = ("dataset", "method", "scheme", "block", "sparsity", "epochs", "lr", "batch_size", "seed", "init")
    return {k: getattr(args, k) for k in keys}


def cmd_train(args) -> int:
    import math

    from .demo import accuracy, pack_model, prunable_sparsity
    from .sparsify import sparsify
    from .methods.srste import train_srste

    out = _check_out_dir(args.output)
    _threads(args)
    method = TrainMethod(args.method)
    if method in (TrainMethod.SRSTE, TrainMethod.STE, TrainMethod.GAP):
        scheme = parse_scheme_arg(args.scheme or "2:4")
    elif args.scheme:
        raise UsageError(f"--scheme is for --method srste/ste/gap; --method {method.value} "
                         + ("trains dense" if method == TrainMethod.DENSE else "uses --block/--sparsity"))
    else:
        scheme = None
    if args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs}: must be >= 1")
    ckpt = out / "checkpoint.pt"
    if (ckpt.exists() or (out / "model.pt").exists()) and not args.resume:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it (or choose another -o)")
    data, make = _dataset_and_model(args)
    model = make()
    _load_init(args, model)
    progress = _progress(args)
    history: list[dict] = []
    result: dict = {"dataset": args.dataset, "method": method.value, "config": _train_fingerprint(args)}

    if method in (TrainMethod.DENSE, TrainMethod.SRSTE, TrainMethod.STE):
        if method != TrainMethod.DENSE:
            rep = sparsify(model, scheme, srste=method == TrainMethod.SRSTE)
            if not rep.swapped:
                raise UsageError(f"--scheme {args.scheme}: no layer of the {args.dataset} model fits it ({rep})")
            result["sparsify"] = rep.to_dict()
        steps_per_epoch = math.ceil(len(data.y_train) / args.batch_size)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
        start = 0
        fp = _train_fingerprint(args)
        if args.resume and ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            if state.get("fingerprint") != fp:
                raise UsageError(f"--resume: {ckpt} was written by a different run ({state.get('fingerprint')}); "
                                 "use the same options or another -o")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start, history = state["epoch"], state["history"]
            print(f"--resume: continuing after epoch {start} of {args.epochs}")
        from tqdm.auto import tqdm

        bar = tqdm(range(start, args.epochs), desc=f"train {method.value}", disable=not progress, initial=start,
                   total=args.epochs)
        for ep in bar:
            losses = train_srste(model, data.train_batches(args.batch_size, seed=args.seed * 1000 + ep), opt,
                                 scheduler=sched, progress=False)
            acc = accuracy(model, data)
            history.append({"epoch": ep + 1, "loss": sum(losses) / len(losses), "test_accuracy": acc})
            bar.set_postfix_str(f"loss {history[-1]['loss']:.3f} acc {100 * acc:.1f}%")
            state = {"fingerprint": fp, "epoch": ep + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "history": history}
            _atomic_write_bytes(ckpt, lambda p, s=state: torch.save(s, p))
        final = model
        if method != TrainMethod.DENSE:
            packed = pack_model(model)
            _atomic_write_bytes(out / "model_packed.pt", lambda p: torch.save(packed.state_dict(), p))
            final = _to_plain(model)
    elif method == TrainMethod.GAP:
        from .methods.gap import gap_train

        kw = _gap_target(scheme, model)
        res = gap_train(model, (data.x_train, data.y_train), method=args.gap_method, checkpoint_dir=str(out / "gap"),
                        resume=args.resume, progress=progress, epochs_per_step=args.epochs, finetune_epochs=args.epochs,
                        partitions=args.partitions, seed=args.seed, batch_size=args.batch_size, **kw)
        history = [h for h in res.history]
        final = res.model
    else:  # 1xN block pruning + fine-tune with frozen masks
        from .methods.blockprune import prune_1xn

        if args.resume and (out / "model.pt").is_file():
            print(f"--resume: {out / 'model.pt'} holds a finished 1xN run (1xN fine-tuning restarts only as a whole)")
            return EXIT_OK
        res = prune_1xn(model, n=args.block, sparsity=args.sparsity, data=(data.x_train, data.y_train),
                        epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, progress=progress, export=False)
        history = [{"epoch": args.epochs, "loss": res.train_loss}]
        result["skipped"] = list(res.skipped)
        final = res.model
    final.eval()
    acc = accuracy(final, data)
    result.update({"test_accuracy": acc, "sparsity_nm_layers": prunable_sparsity(final)[0],
                   "sparsity_all": prunable_sparsity(final)[1], "history": history})
    _atomic_write_bytes(out / "model.pt", lambda p: torch.save(final.state_dict(), p))
    _write_json(out / "train.json", result)
    print(f"{method.value}: test accuracy {100 * acc:.1f}%, sparsity {100 * result['sparsity_nm_layers']:.1f}% of the N:M "
          f"layers; wrote {out / 'model.pt'} (`nmkern inspect` it) and {out / 'train.json'}")
    return EXIT_OK


def _to_plain(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every sparse module turned back into nn.Linear / nn.Conv2d holding the masked weight."""
    import copy

    from .nn import SparseConv2d, SparseLinear

    plain = copy.deepcopy(model)
    for name, mod in list(plain.named_modules()):
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, child, mod.to_dense())
    return plain


def _gap_target(scheme, model: torch.nn.Module) -> dict:
    from .methods.masking import PRUNABLE_TYPES
    from .sparsify import parse_layer_pattern

    if isinstance(scheme, str):
        pat = parse_layer_pattern(scheme)
        layers = dict((n, mod) for n, mod in model.named_modules() if isinstance(mod, PRUNABLE_TYPES))
        if str(pat.pattern) == "1xn":
            fit = [n for n, mod in layers.items() if mod.weight.shape[0] % pat.block == 0]
            kw = {"target": "1xn", "block": pat.block, "sparsity": pat.sparsity}
        else:
            fit = [n for n, mod in layers.items() if mod.weight.shape[1] % pat.m == 0]  # in features / channels
            kw = {"target": "nm", "n": pat.n, "m": pat.m}
        if not fit:
            raise UsageError(f"--scheme {scheme}: no layer of the model fits it")
        skipped = sorted(set(layers) - set(fit))
        if skipped:
            print(f"gap: left dense (shape does not fit {scheme}): {', '.join(skipped)}")
        return kw | {"layers": fit}
    layers = {k: v for k, v in scheme.items() if v is not None}
    bad = [k for k, v in layers.items() if "*" in k or "?" in k or isinstance(v, str) and v.lower().startswith("1xn")]
    if bad:
        raise UsageError(f"--method gap takes an N:M scheme with exact layer names; not {bad}")
    return {"target": "nm", "scheme": {k: tuple(v) if not isinstance(v, str) else tuple(map(int, v.split(":")))
                                       for k, v in layers.items()}, "layers": list(layers)}


# --------------------------------------------------------------------------- bench


def _parse_int_list(flag: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} {text!r}: give positive integers separated by commas, e.g. 1,16,256")
    return vals


def _int_list_type(text: str) -> list[int]:
    try:
        return _parse_int_list("", text)
    except UsageError:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas") from None


def _parse_bench_pattern(text: str):
    """'2:4' -> ('nm', n, m, 0, 0.0); '1x4:0.75' / '1xN:4:0.75' -> ('1xn', 0, 0, 4, 0.75)."""
    t = text.strip().lower()
    if t.startswith("1xn:"):
        t = "1x" + t[4:]
    if t.startswith("1x"):
        block, _, sp = t[2:].partition(":")
        try:
            b, s = int(block), float(sp)
        except ValueError:
            b, s = 0, -1.0
        if b < 1 or not 0.0 < s < 1.0:
            raise UsageError(f"--pattern {text!r}: write 1x<block>:<sparsity>, e.g. 1x4:0.75")
        return ("1xn", 0, 0, b, s)
    parts = t.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 1 <= n < m <= 16:
            return ("nm", n, m, 0, 0.0)
    raise UsageError(f"--pattern {text!r}: write n:m with 1 <= n < m <= 16 (e.g. 2:4) or 1x<block>:<sparsity> "
                     "(e.g. 1x4:0.75)")


def cmd_bench(args) -> int:
    import statistics

    import torch.nn.functional as F

    from .demo import cpu_name, time_interleaved
    from .dispatch import cpu_kernels
    from .functional import apply_nm, block_mask_1xn
    from .nn import SparseLinear

    try:
        o, i = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        raise UsageError(f"--shape {args.shape!r}: write OUTxIN, e.g. 4096x4096") from None
    if o < 1 or i < 1:
        raise UsageError(f"--shape {args.shape!r}: sizes must be positive")
    batches = _parse_int_list("--batch", args.batch)
    patterns = [(p, _parse_bench_pattern(p)) for p in args.pattern.split(",") if p.strip()]
    for text, (kind, n, m, block, _) in patterns:
        if kind == "nm" and i % m:
            raise UsageError(f"--pattern {text}: in_features {i} is not divisible by m={m}")
        if kind == "1xn" and o % block:
            raise UsageError(f"--pattern {text}: out_features {o} is not divisible by the block size {block}")
    if args.seconds <= 0:
        raise UsageError(f"--seconds {args.seconds}: must be > 0")
    _threads(args)
    out_path = Path(args.json)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    cpu = cpu_kernels() if not cuda else None
    g = torch.Generator().manual_seed(0)
    rows = []
    from tqdm.auto import tqdm

    points = [(t, p, b) for t, p in patterns for b in batches]
    for text, (kind, n, m, block, sparsity), b in tqdm(points, desc="bench", disable=not _progress(args)):
        w = torch.randn(o, i, generator=g)
        w = apply_nm(w, n, m, backend="reference") if kind == "nm" else w * block_mask_1xn(w, block, sparsity,
                                                                                          backend="reference")
        w = w.to(device, dtype)
        x = torch.randn(b, i, generator=g).to(device, dtype)
        lin = torch.nn.Linear(i, o, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        layer = SparseLinear.from_dense(lin, pattern=kind, n=n or 2, m=m or 4, block=block or 4,
                                        sparsity=sparsity or 0.5).pack().eval()
        fns = {"dense": lambda: F.linear(x, w), "nmkern_auto": lambda: layer(x)}
        if cpu is not None:
            prepared = cpu.prepare_cpu_linear(w, kind, n, m, block)
            fns["nmkern_cpu_kernel"] = lambda: prepared(x)
        if cuda and kind == "nm" and (n, m) == (2, 4):
            try:
                ws = torch.sparse.to_sparse_semi_structured(w)
                fns["cusparselt"] = lambda: F.linear(x, ws)
            except Exception as e:  # shape/dtype the library refuses: reported, not fatal
                print(f"cuSPARSELt skipped for {text} batch {b}: {e}", file=sys.stderr)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        with torch.no_grad():
            timed = {k: (lambda f=f: (f(), sync())) for k, f in fns.items()}
            times = time_interleaved(timed, args.seconds)
        row = {"pattern": text, "out_features": o, "in_features": i, "batch": b, "device": device,
               "dtype": str(dtype).replace("torch.", ""), "repeats": len(times["dense"]),
               "auto_path": str(layer._choose(x, b))}
        for k, ts in times.items():
            row[f"{k}_median_ms"] = statistics.median(ts) * 1e3
            row[f"{k}_min_ms"] = min(ts) * 1e3
            if k != "dense":
                row[f"{k}_ratio"] = row[f"{k}_median_ms"] / row["dense_median_ms"]
        rows.append(row)
    meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "cpu_isa": str(cpu.isa()) if cpu is not None else None,
            "command": f"nmkern bench --shape {args.shape} --batch {args.batch} --pattern {args.pattern}"}
    _write_json(out_path, {"meta": meta, "rows": rows})
    cols = [k for k in ("nmkern_cpu_kernel", "nmkern_auto", "cusparselt") if any(f"{k}_ratio" in r for r in rows)]
    print(f"{device} ({meta['gpu'] or meta['cpu']}), {meta['threads']} thread(s), {row['dtype']}; time ratio sparse / "
          "dense (median of interleaved calls; < 1 is faster)")
    head = f"{'pattern':<10} {'batch':>6} {'dense ms':>10} " + " ".join(f"{c:>18}" for c in cols) + "  auto path"
    print(head)
    for r in rows:
        cells = " ".join(f"{r[f'{c}_ratio']:>18.3f}" if f"{c}_ratio" in r else f"{'-':>18}" for c in cols)
        print(f"{r['pattern']:<10} {r['batch']:>6} {r['dense_median_ms']:>10.3f} {cells}  {r['auto_path']}")
    print(f"wrote {out_path}")
    return EXIT_OK


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmkern", description="N:M and 1xN structured sparsity: inspect, prune, train, bench.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="per weight of a checkpoint: shape and which N:M or 1xN pattern it satisfies")
    p.add_argument("file", help="a state_dict checkpoint (torch.save) or TorchScript file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="the whole pipeline on MNIST-1D: dense, DominoSearch, SR-STE, pack, CPU latency")
    p.add_argument("-o", "--output", default="nmkern-demo", help="output folder (default: nmkern-demo)")
    p.add_argument("--quick", action="store_true", help="small run (< 2 min on 2 cores) with the same steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1: the model is small)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prune", help="one-shot prune a saved model to N:M (magnitude) or 1xN blocks")
    p.add_argument("model", help="a state_dict checkpoint (with --factory) or a TorchScript file")
    p.add_argument("--scheme", default=None, help="'n:m' (e.g. 2:4), '1xN:<block>:<sparsity>', or a scheme JSON file")
    p.add_argument("--method", default="magnitude", help="'magnitude' (N:M by |w|) or '1xn:<block>:<sparsity>'")
    p.add_argument("--factory", default=None, help="module:callable building the model of a state_dict checkpoint")
    p.add_argument("-o", "--output", required=True, help="pruned model (same format as the input); report beside it as .json")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of a table")
    p.set_defaults(func=cmd_prune)

    def data_args(p, epochs_help: str):
        p.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"], help="bundled dataset and model")
        p.add_argument("--init", default=None, help="state_dict of the bundled model to start from")
        p.add_argument("-o", "--output", required=True, help="output folder")
        p.add_argument("--resume", action="store_true", help=epochs_help)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are small)")
        p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("search", help="DominoSearch a layer-wise N:M scheme on a bundled dataset")
    data_args(p, "reuse DIR/dense.pt and a finished DIR/scheme.json")
    p.add_argument("--budget", default="params=0.875", help="params=<sparsity> or flops=<reduction> (default params=0.875)")
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--policy", default="fixed_m", choices=["fixed_m", "fixed_n"])
    p.add_argument("--dense-epochs", type=int, default=30, help="dense pretraining epochs when no --init")
    p.add_argument("--lr", type=float, default=0.01)
    # nmkern demo's schedule for the small bundled models (see nmkern.demo.DemoConfig)
    p.add_argument("--decay", type=float, default=0.5)
    p.add_argument("--decay-milestones", type=_int_list_type,
                   default=[200, 400, 600, 800, 1000, 1200])
    p.add_argument("--check-every", type=int, default=10)
    p.add_argument("--max-iters", type=int, default=10000)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("train", help="train the bundled model: dense, SR-STE / STE to a scheme, GaP, or 1xN")
    data_args(p, "continue from DIR's last checkpoint")
    p.add_argument("--method", default="srste", choices=[t.value for t in TrainMethod])
    p.add_argument("--scheme", default=None, help="for srste/ste/gap: 'n:m', '1xN:<block>:<sparsity>' or scheme JSON "
                   "(default 2:4)")
    p.add_argument("--block", type=int, default=4, help="1xn: block size")
    p.add_argument("--sparsity", type=float, default=0.5, help="1xn: fraction of blocks pruned")
    p.add_argument("--epochs", type=int, default=10, help="epochs (gap: per grow step and for the final fine-tune)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gap-method", default="sgap", choices=["sgap", "pgap"])
    p.add_argument("--partitions", type=int, default=2, help="gap: number of partitions")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="sparse-vs-dense linear time ratio table on this machine")
    p.add_argument("--shape", default="4096x4096", help="OUTxIN of the weight (default 4096x4096)")
    p.add_argument("--batch", default="1,16,256", help="batch sizes (default 1,16,256)")
    p.add_argument("--pattern", default="2:4,1:4,1x4:0.75", help="n:m and 1x<block>:<sparsity> patterns")
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per point")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="nmkern-bench.json", help="where the JSON results go")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    threads = torch.get_num_threads()
    try:
        return args.func(args)
    except UsageError as e:
        print(f"nmkern {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError) as e:
        print(f"nmkern {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # pragma: no cover - reported, not hidden
        import traceback

        traceback.print_exc()
        print(f"nmkern {args.command}: internal error: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        torch.set_num_threads(threads)  # --threads is for this command, not for an embedding caller


if __name__ == "__main__":
    raise SystemExit(main())
