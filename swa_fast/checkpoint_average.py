"""Average the weights of saved checkpoints (``python -m swa_fast average``).

Checkpoints are streamed: each is loaded on the CPU, folded into a running
average with the fused :func:`swa_fast.average_` (lerp weight ``w_k / W_k``,
``W_k`` the weights so far; ``1/(k+1)`` unweighted) and dropped before the next
is read, so peak memory is about one checkpoint plus the accumulator, whatever
the number of checkpoints.

* Floating entries are accumulated in float32 (float64 for float64 entries, so
  fp16/bf16 averages do not round at every step) and written back in the
  checkpoint's dtype.
* Integer and bool entries (BatchNorm's ``num_batches_tracked``, step counters)
  are not averaged: the last checkpoint's value is kept.
* Every checkpoint must hold the same keys, shapes and dtypes as the first;
  errors name the file and the key.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from swa_fast._ops import _C, average_

__all__ = ["CheckpointError", "average_checkpoints", "extract_state_dict", "save_atomic", "COMMON_KEYS"]

PathLike = Union[str, os.PathLike]

# Where training scripts usually put the model's weights in a checkpoint dict.
COMMON_KEYS = ("state_dict", "model_state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be averaged with the others; the message names the file (and key)."""


def _load(path: PathLike) -> Any:
    """Read one checkpoint on the CPU. A module-level function so tests can watch the loads."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(isinstance(v, Tensor) for v in value.values())


def extract_state_dict(checkpoint: Any, key: Optional[str] = None, *, source: str = "checkpoint") -> Dict[str, Tensor]:
    """The state_dict inside a loaded checkpoint.

    With ``key``: ``checkpoint[key]``, which must be a dict of tensors. Without:
    the checkpoint itself if it is a dict of tensors, else the first of
    :data:`COMMON_KEYS` that holds one. ``source`` names the file in errors.
    """
    if key is not None:
        if not isinstance(checkpoint, Mapping) or key not in checkpoint:
            found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise CheckpointError(f"{source}: has no key {key!r} (found: {found})")
        state = checkpoint[key]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{source}: {key!r} is a {type(state).__name__}, not a state_dict")
        if not state:
            raise CheckpointError(f"{source}: {key!r} is an empty state_dict")
        for name, value in state.items():
            if not isinstance(value, Tensor):
                raise CheckpointError(f"{source}: entry {name!r} of {key!r} is a {type(value).__name__}, not a tensor")
        return dict(state)
    if _is_tensor_dict(checkpoint):
        return dict(checkpoint)
    if isinstance(checkpoint, Mapping):
        for common in COMMON_KEYS:
            if _is_tensor_dict(checkpoint.get(common)):
                return dict(checkpoint[common])
    raise CheckpointError(
        f"{source}: no state_dict found (neither a dict of tensors nor one under {', '.join(COMMON_KEYS)}); "
        "name it with --key"
    )


def _select(state: Dict[str, Tensor], prefix: Optional[str], strip_prefix: bool, source: str) -> Dict[str, Tensor]:
    if not prefix:
        return state
    kept = {(name[len(prefix) :] if strip_prefix else name): value for name, value in state.items() if name.startswith(prefix)}
    if not kept:
        raise CheckpointError(f"{source}: no key starts with prefix {prefix!r}")
    return kept


def _normalized_weights(weights: Optional[Sequence[float]], count: int) -> Optional[List[float]]:
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise CheckpointError(f"{len(weights)} weights given for {count} checkpoints")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:  # `not >=` also rejects NaN
        raise CheckpointError(f"weights must be >= 0 with a positive sum, got {weights}")
    return weights


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same_layout(reference: Dict[str, Tensor], state: Dict[str, Tensor], first: str, source: str) -> None:
    missing = [name for name in reference if name not in state]
    if missing:
        raise CheckpointError(f"{source}: key {missing[0]!r} (in {first}) is missing ({len(missing)} missing in all)")
    extra = [name for name in state if name not in reference]
    if extra:
        raise CheckpointError(f"{source}: key {extra[0]!r} is not in {first} ({len(extra)} extra in all)")
    for name, value in state.items():
        ref = reference[name]
        if value.shape != ref.shape:
            raise CheckpointError(
                f"{source}: key {name!r} has shape {tuple(value.shape)}, {first} has {tuple(ref.shape)}"
            )
        if value.dtype != ref.dtype:
            raise CheckpointError(f"{source}: key {name!r} has dtype {value.dtype}, {first} has {ref.dtype}")


def _fold(accumulators: Dict[str, Tensor], state: Dict[str, Tensor], *, first: bool, lerp_weight: float) -> None:
    """Fold one checkpoint into the accumulators. A function of its own so that no
    loop variable keeps one of the checkpoint's tensors alive after it returns."""
    fused_avg: List[Tensor] = []
    fused_cur: List[Tensor] = []
    for name, value in state.items():
        if not (value.is_floating_point() or value.is_complex()):
            accumulators[name] = value.clone()  # the last checkpoint's; clone: do not pin the loaded storage
        elif first:
            dtype = value.dtype if value.is_complex() else _accumulator_dtype(value.dtype)
            accumulators[name] = value.to(dtype, memory_format=torch.contiguous_format, copy=True)
        else:
            current = value.contiguous()
            if _C.is_fusable_pair(accumulators[name], current):
                fused_avg.append(accumulators[name])
                fused_cur.append(current)
            else:  # complex: torch's lerp
                accumulators[name].lerp_(current.to(accumulators[name].dtype), lerp_weight)
    if fused_avg:
        # One fused pass over every floating entry (lower-precision current into fp32 accumulators).
        average_(fused_avg, fused_cur, min(1.0, lerp_weight))


def average_checkpoints(
    paths: Sequence[PathLike],
    *,
    key: Optional[str] = None,
    prefix: Optional[str] = None,
    strip_prefix: bool = False,
    weights: Optional[Sequence[float]] = None,
    progress: bool = False,
    load: Optional[Callable[[PathLike], Any]] = None,
) -> Dict[str, Tensor]:
    """The (weighted) average of the state_dicts saved at ``paths``, one checkpoint in memory at a time.

    Args:
        paths: the checkpoint files (``torch.save`` outputs), at least one.
        key: take the state_dict from ``checkpoint[key]``; default: auto-detect
            (see :func:`extract_state_dict`).
        prefix: keep only the entries whose name starts with it.
        strip_prefix: remove ``prefix`` from the kept names (e.g. ``module.``
            of a DDP or ``AveragedModel`` state_dict).
        weights: one non-negative weight per checkpoint (normalized); default equal.
        progress: show a tqdm bar.
        load: reads one file (default ``torch.load(path, map_location="cpu", weights_only=True)``).

    Returns:
        A new state_dict on the CPU, in the first checkpoint's key order and
        dtypes. Integer/bool entries are the last checkpoint's.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise CheckpointError("no checkpoints to average: give at least one")
    weights = _normalized_weights(weights, len(paths))
    load = load or _load
    iterator: Any = paths
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(paths, desc="average", unit="ckpt", file=sys.stderr)

    reference: Dict[str, Tensor] = {}  # the first checkpoint's metadata (meta tensors: no memory)
    accumulators: Dict[str, Tensor] = {}
    seen_weight = 0.0
    for index, path in enumerate(iterator):
        try:
            checkpoint = load(path)
        except Exception as error:  # any unreadable file: truncated, not a checkpoint, unsafe pickle
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(error).__name__}: {error})") from error
        state = _select(extract_state_dict(checkpoint, key, source=path), prefix, strip_prefix, path)
        del checkpoint  # only `state`'s tensors stay alive, and only until the next file
        if index == 0:
            reference = {name: value.to("meta") for name, value in state.items()}
        else:
            _check_same_layout(reference, state, paths[0], path)

        weight_k = 1.0 if weights is None else weights[index]
        seen_weight += weight_k
        # lerp weight w_k / W_k; while all weights so far are 0 any value is right: copy.
        lerp_weight = weight_k / seen_weight if seen_weight > 0 else 1.0
        _fold(accumulators, state, first=index == 0, lerp_weight=lerp_weight)
        del state  # the last reference to this checkpoint's tensors

    return {name: accumulators[name].to(reference[name].dtype) for name in reference}


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file in ``path``'s directory, then ``os.replace``:
    readers see the old file or the complete new one, never a partial one."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def add_arguments(parser: Any) -> None:
    """The ``average`` subcommand's options."""
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files to average")
    parser.add_argument("-o", "--output", required=True, help="where to write the averaged state_dict")
    parser.add_argument("--key", help=f"take the state_dict from checkpoint[KEY] (default: auto: {', '.join(COMMON_KEYS)})")
    parser.add_argument("--prefix", help="keep only the keys starting with PREFIX")
    parser.add_argument("--strip-prefix", action="store_true", help="remove PREFIX from the kept keys (e.g. module.)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per checkpoint")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def run(args: Any) -> int:
    """``python -m swa_fast average``: 0 on success, 1 with a message on stderr otherwise."""
    if args.strip_prefix and not args.prefix:
        print("swa_fast average: error: --strip-prefix needs --prefix", file=sys.stderr)
        return 1
    try:
        averaged = average_checkpoints(
            args.checkpoints,
            key=args.key,
            prefix=args.prefix,
            strip_prefix=args.strip_prefix,
            weights=args.weights,
            progress=not args.quiet and sys.stderr.isatty(),
        )
        save_atomic(averaged, args.output)
    except (CheckpointError, OSError) as error:
        print(f"swa_fast average: error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"averaged {len(args.checkpoints)} checkpoints ({len(averaged)} entries) into {args.output}")
    return 0
