"""Checkpoint I/O that survives crashes and refuses to run code.

* ``save_checkpoint`` writes to a temporary file in the target directory, flushes and fsyncs
  it, then renames it over the final name: a crash leaves either the old file or the new one,
  never a half-written file under the final name.
* ``load_checkpoint`` only uses ``torch.load(weights_only=True)``; every failure becomes a
  ``CheckpointError`` naming the file and saying what is wrong with it (missing, truncated,
  not a checkpoint, contains code).
* Everything saved must be loadable with ``weights_only=True``: tensors, numbers, strings,
  lists, tuples, dicts. ``save_checkpoint`` checks this *before* writing, and
  ``get_rng_state``/``plain_args`` put RNG states and argparse flags in that form.
"""
import argparse
import logging
import os
import pickle
import pickletools
import random
import re
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or used; the message names the file."""


# ---------------------------------------------------------------- what may be stored
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def find_unsafe(obj: Any, where: str = "state") -> Optional[str]:
    """Return a description of the first value that ``torch.load(weights_only=True)`` would
    refuse (e.g. ``"state['args']['exp_dir'] is a PosixPath"``), or None if all is plain."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _SCALARS):
        return None
    if type(obj) in (list, tuple, set):
        for i, x in enumerate(obj):
            bad = find_unsafe(x, f"{where}[{i}]")
            if bad:
                return bad
        return None
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                return f"{where} has a key of type {type(k).__name__}"
            bad = find_unsafe(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    return f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}"


def plain_args(args: Union[argparse.Namespace, Mapping[str, Any]], keys: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """argparse flags as a plain dict (str/int/float/bool/None/list), so that decode can rebuild
    the model from a checkpoint loaded with weights_only. Paths and other objects become str."""
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    if keys is not None:
        d = {k: d[k] for k in keys if k in d}

    def conv(v):
        if isinstance(v, (bool, int, float, str, type(None))):
            return v
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        return str(v)

    return {str(k): conv(v) for k, v in d.items()}


# ---------------------------------------------------------------- RNG state
def get_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors and numbers only."""
    version, internal, gauss = random.getstate()
    state: Dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned (parts that are absent are left alone)."""
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy as np

        npst = state["numpy"]
        keys = npst["keys"].numpy().astype(np.uint32)
        np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in saved])
        else:
            logging.warning(
                "Checkpoint has CUDA RNG states for %d devices but %d are visible; CUDA RNG not restored",
                len(saved),
                torch.cuda.device_count(),
            )


# ---------------------------------------------------------------- save
def save_checkpoint(path: PathLike, **state: Any) -> Path:
    """Write ``state`` (a dict of plain values and tensors) to ``path`` atomically.

    The data goes to a temporary file in the same directory (so the final rename never crosses
    file systems), is flushed and fsynced, and only then replaces ``path``.
    """
    path = Path(path)
    bad = find_unsafe(state)
    if bad:
        raise CheckpointError(
            f"Cannot save checkpoint {path}: {bad}, which torch.load(weights_only=True) would refuse. "
            "Store only tensors, numbers, strings, lists and dicts (see splitformer.checkpoint.plain_args "
            "and get_rng_state)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort; not supported on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- load
def _pickle_globals(data: bytes) -> List[str]:
    """Module.name of every global a pickle would import, found by reading its opcodes
    (pickletools never executes anything)."""
    names: List[str] = []
    strings: List[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a truncated/odd pickle: report what was found so far
        pass
    return names


def _suspicious_globals(path: Path) -> List[str]:
    """Globals in the checkpoint's pickle beyond what torch.save itself writes."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        try:
            names = _pickle_globals(path.read_bytes())
        except OSError:
            names = []
    harmless = ("torch.", "collections.OrderedDict", "builtins.set")
    return sorted({n for n in names if not n.startswith(harmless)})


def _classify_load_error(path: Path, err: Exception) -> str:
    msg = str(err)
    names = _suspicious_globals(path) if isinstance(err, pickle.UnpicklingError) else []
    if not names and isinstance(err, pickle.UnpicklingError) and "GLOBAL" in msg:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", msg))) or ["unknown globals"]
    if names:
        return (
            f"refused to load: it contains code or Python objects ({', '.join(names)}) "
            "that unpickling would import and run; torch.load(weights_only=True) only accepts tensors, numbers, "
            "strings, lists and dicts. Do not load it unless you trust its origin; if you do, re-save its "
            "tensors with a trusted script"
        )
    if isinstance(err, pickle.UnpicklingError) and "Unsupported operand" in msg:
        op = re.findall(r"Unsupported operand (\d+)", msg)
        return (
            f"uses pickle opcodes weights_only cannot read (operand {op[0] if op else '?'}): a plain Python pickle "
            "or a file saved with a non-default pickle protocol, not a standard torch.save checkpoint"
        )
    if isinstance(err, EOFError) or "unexpected EOF" in msg or "central directory" in msg:
        return "truncated: the file ends early (a crash or full disk while writing?); use an earlier checkpoint"
    if isinstance(err, (RuntimeError, zipfile.BadZipFile)) and ("corrupt" in msg or "CRC" in msg or "zip" in msg.lower()):
        return f"corrupted ({msg.splitlines()[0][:200]}); use an earlier checkpoint"
    return f"not a readable torch checkpoint ({type(err).__name__}: {msg.splitlines()[0][:200] if msg else ''})"


def load_checkpoint(
    path: PathLike, map_location: Union[str, torch.device, None] = "cpu", required_keys: Sequence[str] = ("model",)
) -> Dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises ``CheckpointError`` naming the file if it is missing, empty, truncated, not a torch
    checkpoint, contains code, or lacks any of ``required_keys``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"Checkpoint {path}: empty file (0 bytes); it was never written completely")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"Checkpoint {path}: truncated ({size} bytes, the zip archive has no end record); "
                "it was not written completely -- use an earlier checkpoint"
            )
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("/data.pkl") for n in z.namelist()):
                raise CheckpointError(f"Checkpoint {path}: a zip archive but not a torch checkpoint (no data.pkl inside)")
    elif head[0] != _PICKLE_PROTO:
        raise CheckpointError(
            f"Checkpoint {path}: not a torch checkpoint (starts with {head!r}, expected a zip archive from torch.save)"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"Checkpoint {path}: {_classify_load_error(path, e)}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"Checkpoint {path}: holds a {type(ckpt).__name__}, expected a dict of training state")
    missing = [k for k in required_keys if k not in ckpt]
    if missing:
        hint = ""
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = " (it looks like a bare state_dict, not a Splitformer checkpoint)"
        raise CheckpointError(
            f"Checkpoint {path}: missing {missing}; it has {sorted(map(str, ckpt))[:10]}{hint}"
        )
    return ckpt


# ---------------------------------------------------------------- compatibility checks
def diff_args(
    ckpt_args: Mapping[str, Any], current_args: Union[Mapping[str, Any], argparse.Namespace], keys: Optional[Iterable[str]] = None
) -> List[Tuple[str, Any, Any]]:
    """(flag, checkpoint value, current value) for each flag that differs. ``keys`` defaults to
    the flags stored in the checkpoint; a flag absent on one side shows as ``"<absent>"``."""
    cur = vars(current_args) if isinstance(current_args, argparse.Namespace) else dict(current_args)
    keys = list(ckpt_args) if keys is None else list(keys)

    def norm(v):
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    out = []
    for k in keys:
        a = ckpt_args.get(k, "<absent>")
        b = cur.get(k, "<absent>")
        if norm(a) != norm(b):
            out.append((k, a, b))
    return out


def check_architecture(
    ckpt_args: Mapping[str, Any],
    current_args: Union[Mapping[str, Any], argparse.Namespace],
    keys: Optional[Iterable[str]] = None,
    path: Optional[PathLike] = None,
) -> None:
    """Raise ``CheckpointError`` listing every model flag on which the checkpoint and the
    current run disagree (e.g. a checkpoint of another preset)."""
    diffs = diff_args(ckpt_args, current_args, keys)
    if diffs:
        lines = "\n".join(f"  --{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs)
        raise CheckpointError(
            f"Checkpoint {path or '<state>'} was made for a different model ({len(diffs)} flag(s) differ):\n{lines}\n"
            "Pass the checkpoint's flags (or its --preset), or use a checkpoint of this model."
        )


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> Mapping[str, torch.Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return OrderedDict((k[len(prefix):], v) for k, v in state_dict.items())
    return state_dict


def load_model_state(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Optional[PathLike] = None, strict: bool = True
) -> None:
    """``model.load_state_dict`` with a readable summary of missing/unexpected keys and shape
    mismatches (instead of torch's wall of text). A DDP ``module.`` prefix is removed."""
    state_dict = _strip_prefix(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:8]) + (" ..." if len(shapes) > 8 else ""))
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if strict and unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        )
    if problems:
        raise CheckpointError(
            f"Checkpoint {path or '<state>'} does not fit this model (another architecture or preset?):\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(state_dict, strict=strict)


# ---------------------------------------------------------------- files in an experiment dir
def find_checkpoints(exp_dir: PathLike, iteration: int = 0) -> List[Path]:
    """``checkpoint-B.pt`` files in ``exp_dir``, newest (largest B) first; with
    ``iteration > 0`` only those with ``B <= iteration``. Temporary files are ignored."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    found = []
    for p in exp_dir.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            b = int(m.group(1))
            if iteration <= 0 or b <= iteration:
                found.append((b, p))
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def remove_temp_files(exp_dir: PathLike) -> List[Path]:
    """Delete temporary files left by saves that were killed mid-write (``.NAME.pt.*.tmp``).
    Call it only when no save is in progress (e.g. right after one, on the saving rank)."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    removed = []
    for p in exp_dir.glob(".*.pt.*.tmp"):
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def remove_old_checkpoints(exp_dir: PathLike, keep_last_k: int) -> List[Path]:
    """Delete all but the ``keep_last_k`` newest ``checkpoint-B.pt`` files (``keep_last_k <= 0``
    keeps everything), and leftovers of interrupted saves. Returns the removed paths."""
    removed = remove_temp_files(exp_dir)
    if keep_last_k <= 0:
        return removed
    for p in find_checkpoints(exp_dir)[keep_last_k:]:
        p.unlink()
        removed.append(p)
    return removed


def epoch_checkpoint_paths(exp_dir: PathLike, epoch: int, avg: int) -> List[Path]:
    """``epoch-(E-A+1).pt .. epoch-E.pt`` for decode's ``--epoch E --avg A``; all must exist."""
    if avg < 1:
        raise CheckpointError(f"--avg must be >= 1, got {avg}")
    if epoch - avg + 1 < 1:
        raise CheckpointError(f"--avg {avg} is too large for --epoch {epoch}: there is no epoch-{epoch - avg + 1}.pt")
    paths = [Path(exp_dir) / f"epoch-{e}.pt" for e in range(epoch - avg + 1, epoch + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(f"Checkpoints needed for --epoch {epoch} --avg {avg} are missing: {', '.join(missing)}")
    return paths


def average_checkpoints(paths: Sequence[PathLike], key: str = "model", map_location: str = "cpu") -> "OrderedDict[str, torch.Tensor]":
    """Average the ``key`` state dicts of ``paths``: floating tensors are averaged (accumulated in
    float64), other tensors (e.g. counters) are taken from the last checkpoint."""
    if not paths:
        raise CheckpointError("average_checkpoints: no checkpoint paths given")
    n = len(paths)
    acc: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    first_path = paths[0]
    last: Mapping[str, torch.Tensor] = {}
    for i, path in enumerate(paths):
        sd = _strip_prefix(load_checkpoint(path, map_location=map_location, required_keys=(key,))[key])
        if i == 0:
            for k, v in sd.items():
                acc[k] = v.to(torch.float64) if v.is_floating_point() else v
        else:
            if set(sd) != set(acc):
                extra = sorted(set(sd) - set(acc))[:5]
                lack = sorted(set(acc) - set(sd))[:5]
                raise CheckpointError(
                    f"Cannot average {path} with {first_path}: different parameters (only in {path}: {extra}; "
                    f"only in {first_path}: {lack})"
                )
            for k, v in sd.items():
                if tuple(v.shape) != tuple(acc[k].shape):
                    raise CheckpointError(
                        f"Cannot average {path} with {first_path}: {k} has shape {tuple(v.shape)} vs {tuple(acc[k].shape)}"
                    )
                if v.is_floating_point():
                    acc[k] += v.to(torch.float64)
        last = sd
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in acc.items():
        ref = last[k]
        out[k] = (v / n).to(ref.dtype) if ref.is_floating_point() else ref.clone()
    return out
