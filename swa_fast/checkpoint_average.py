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
* Entries that cannot be averaged are refused, naming the file and the key:
  sparse tensors (save them dense, ``tensor.to_dense()``), quantized ones
  (``tensor.dequantize()``, or average the float checkpoints before
  quantizing), nested ones, and meta tensors, which hold no data. To average
  the rest of such a checkpoint, select the other entries with ``--prefix``
  (or another state_dict with ``--key``).
* Files are loaded like ``torch.load(weights_only=True)``: tensors and plain
  containers only, never pickled objects (loading those can run code). A file
  that cannot be loaded gets an error saying what it is not and what is read:
  not a ``torch.save`` file at all (a text file, say), a ``torch.save`` file
  holding a pickled class (re-save the weights:
  ``torch.save(model.state_dict(), path)``), or a damaged one. torch's own
  advice to load with ``weights_only=False`` is never passed on.
* ``--weights`` must be finite and >= 0, with a positive sum that does not
  overflow; bad weights are refused before any file is read.
* The output is written like ``torch.save`` would, but atomically: a new file
  gets ``0666 & ~umask``, an existing one keeps its mode (and is refused when
  it is not writable, or not a regular file), a symlink is written through
  (the link stays, its target gets the new content). The temporary file is
  ``.{name}.swa_fast-tmp-{host}-{pid}-{random}`` next to the target; those a
  killed run left (their process, on this host, is gone) are removed by the
  next save to the same output.
"""

from __future__ import annotations

import errno
import io
import math
import numbers
import os
import pickle
import re
import secrets
import socket
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from swa_fast.ops.average import average_, is_fusable_pair

__all__ = ["CheckpointError", "average_checkpoints", "extract_state_dict", "save_atomic", "COMMON_KEYS"]

PathLike = Union[str, os.PathLike]

# Where training scripts usually put the model's weights in a checkpoint dict.
COMMON_KEYS = ("state_dict", "model_state_dict", "model")

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)

# Temporary outputs are ".{name}.swa_fast-tmp-{host}-{pid}-{8 hex}": recognisable, so that
# the ones a killed run left can be told from every other file and removed.
_TEMP_TAG = "swa_fast-tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be averaged with the others; the message names the file (and key)."""


# What the averaging reads, said whenever a file is not that.
ACCEPTED = (
    "`python -m swa_fast average` reads files written by torch.save holding a state_dict "
    f"(or a dict with one under {'/'.join(COMMON_KEYS)}, or --key)"
)
RESAVE = "torch.save(model.state_dict(), path)"


def _load(path: PathLike) -> Any:
    """Read one checkpoint on the CPU. A module-level function so tests can watch the loads."""
    return torch.load(path, map_location="cpu", weights_only=True)


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Reads plain values only: any class or function reference is refused, so peeking into an
    unknown file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} refused")


def _is_torch_save_file(path: PathLike) -> bool:
    """Whether the file starts as torch.save writes: a zip archive whose first entry is
    ``<name>/data.pkl`` (torch >= 1.6), or a pickle stream opening with torch's magic number (the
    legacy format). Only the head is read, so a truncated torch.save file still counts."""
    try:
        with open(path, "rb") as file:
            head = file.read(30 + 256)  # a zip local file header (30 bytes) and the entry's name
    except OSError:
        return False
    if head[:4] == b"PK\x03\x04":
        name_length = int.from_bytes(head[26:28], "little")
        return head[30 : 30 + name_length].endswith(b"/data.pkl")
    try:  # the magic number is the stream's first object, well within the head: never read more
        return _NoGlobalsUnpickler(io.BytesIO(head)).load() == torch.serialization.MAGIC_NUMBER
    except Exception:  # not a pickle, or one that starts otherwise
        return False


def _short_reason(error: BaseException) -> str:
    """The gist of a load error in one line: torch's weights_only failures wrap the unpickler's
    finding in advice this tool does not follow (weights_only=False would run the file's code)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    text = re.sub(r"^\s*\[enforce fail at [^\]]*\][\s.]*", "", text)  # c10's source location: no help to a user
    gist = " ".join(text.split()).split(". ")[0].rstrip(".")[:160]
    if not gist or "weights_only" in gist:  # say nothing rather than pass on that advice
        return type(error).__name__
    return f"{type(error).__name__}: {gist}"


def _file_start(path: PathLike) -> str:
    """What the file begins with, for an error on a file that is not a checkpoint."""
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError:
        return "unreadable"
    return f"starts with {head!r}" if head else "the file is empty"


def _load_error(path: str, error: Exception) -> CheckpointError:
    """The error for a file ``load`` could not read: what the file is not, and what is read."""
    if isinstance(error, OSError):  # missing, a directory, no permission: the OS says it best
        return CheckpointError(f"{path}: cannot read checkpoint ({error.strerror or error})")
    if not _is_torch_save_file(path):
        return CheckpointError(
            f"{path}: not a PyTorch checkpoint (torch.save file): cannot read it "
            f"({_short_reason(error)}; {_file_start(path)}). {ACCEPTED}"
        )
    blocked = re.search(r"unsupported GLOBAL ([\w.]+) whose module ([\w.]+) is blocked", str(error))
    if isinstance(error, pickle.UnpicklingError) and blocked:
        # A module torch blocks outright (os, subprocess, builtins' eval...): the file's pickle would
        # call it when loaded, i.e. it may contain code. Never suggest a way to load it.
        return CheckpointError(
            f"{path}: refused: its pickle references {blocked[1]}, a global that is not allowed (module "
            f"{blocked[2]} is blocked: calling it could run commands or code). The file may contain code; it was "
            "not loaded, and nothing in it ran. Do not load it in another way unless you know who made it and why"
        )
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if isinstance(error, pickle.UnpicklingError) and refused:
        return CheckpointError(
            f"{path}: a torch.save file holding a pickled {refused[1]}, not only tensors and plain containers; "
            "for safety `python -m swa_fast average` loads only tensors and plain containers (dicts, lists, "
            "tuples, numbers, strings), never pickled objects, whose loading can run code. "
            f"Save the weights as a state_dict and average those: {RESAVE}"
        )
    return CheckpointError(
        f"{path}: a torch.save file that cannot be loaded ({_short_reason(error)}): truncated or damaged? "
        f"Saving it again with {RESAVE} gives a file this tool reads"
    )


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


def _unsupported(value: Tensor) -> Optional[Tuple[str, str]]:
    """(what the entry is, what the user can do) for an entry that cannot be averaged, else None."""
    if value.is_nested:
        return "nested tensor", "save its components as separate dense tensors"
    if value.layout in _SPARSE_LAYOUTS:
        return f"sparse tensor ({value.layout})", "save it dense (tensor.to_dense())"
    if value.layout != torch.strided:
        return f"tensor of layout {value.layout}", "save it dense (tensor.to_dense())"
    if value.is_quantized:
        return (
            f"quantized tensor ({value.dtype})",
            "save it dequantized (tensor.dequantize()) or average the float checkpoints before quantizing",
        )
    if value.is_meta:
        # A meta "average" is a tensor without data that loads as garbage or fails later: refuse it here.
        return "meta tensor (no data: saved from a model on the meta device?)", "save the checkpoint with real weights"
    return None


def _check_entries(state: Dict[str, Tensor], prefix: Optional[str], source: str) -> None:
    """Refuse the entries (among those ``prefix`` keeps) that cannot be averaged, naming file and key.
    Checked on every file before anything is folded: a later file may hold what the first did not."""
    for name, value in state.items():
        if prefix and not name.startswith(prefix):
            continue
        problem = _unsupported(value)
        if problem is not None:
            what, remedy = problem
            raise CheckpointError(
                f"{source}: key {name!r} is a {what}; sparse, quantized, nested and meta entries cannot be "
                f"averaged: {remedy}, or select the other entries with --prefix (another state_dict with --key)"
            )


def _check_string_keys(state: Dict[Any, Tensor], prefix: Optional[str], source: str) -> None:
    """--prefix selects keys by their start: every key must then be a string."""
    if prefix is None:
        return
    for name in state:
        if not isinstance(name, str):
            raise CheckpointError(f"{source}: key {name!r} is a {type(name).__name__}, not a string: --prefix selects "
                                  "string keys; leave --prefix out, or save the state_dict with string keys")


def _select(state: Dict[str, Tensor], prefix: Optional[str], strip_prefix: bool, source: str) -> Dict[str, Tensor]:
    if not prefix:
        return state
    kept = {(name[len(prefix) :] if strip_prefix else name): value for name, value in state.items() if name.startswith(prefix)}
    if not kept:
        raise CheckpointError(f"{source}: no key starts with prefix {prefix!r}")
    return kept


def _normalized_weights(weights: Optional[Sequence[float]], count: int, signed: bool = False) -> Optional[List[float]]:
    if weights is None:
        if signed:
            raise CheckpointError("signed=True needs the weights: the coefficients of the weighted sum")
        return None
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise CheckpointError(f"weights must be numbers, got {type(w).__name__} {w!r}")
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise CheckpointError(f"{len(weights)} weights given for {count} checkpoints")
    # inf/NaN would give lerp weights inf/inf (NaN) or w/inf (0): one checkpoint would silently be the "average".
    if not all(math.isfinite(w) for w in weights):
        raise CheckpointError(f"weights must be finite numbers, got {weights}")
    if signed:  # the caller's coefficients, used as they are: any finite sign and sum
        return weights
    # Negative weights are refused: a running sum W_k could reach 0 or go negative mid-way.
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise CheckpointError(f"weights must be >= 0 with a positive sum, got {weights}")
    if not math.isfinite(sum(weights)):  # each finite, e.g. 1e308 twice: the later lerp weights would be w/inf = 0
        raise CheckpointError(f"the sum of the weights overflows to inf, got {weights}: scale them down")
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


def _fold_signed(accumulators: Dict[str, Tensor], state: Dict[str, Tensor], *, first: bool, weight: float) -> None:
    """Add ``weight`` times one checkpoint to the accumulators (a weighted sum, not an average):
    floating entries in fp32 (fp64 for fp64), integer ones the last checkpoint's."""
    for name, value in state.items():
        if not (value.is_floating_point() or value.is_complex()):
            accumulators[name] = value.clone()
        elif first:
            dtype = value.dtype if value.is_complex() else _accumulator_dtype(value.dtype)
            accumulators[name] = torch.mul(value.to(dtype, memory_format=torch.contiguous_format), weight)
        else:
            accumulators[name].add_(value, alpha=weight)


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
            if is_fusable_pair(accumulators[name], current):
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
    key: Union[None, str, Sequence[str]] = None,
    prefix: Optional[str] = None,
    strip_prefix: bool = False,
    weights: Optional[Sequence[float]] = None,
    signed: bool = False,
    progress: bool = False,
    load: Optional[Callable[[PathLike], Any]] = None,
) -> Dict[str, Tensor]:
    """The (weighted) average of the state_dicts saved at ``paths``, one checkpoint in memory at a time.

    Args:
        paths: the checkpoint files (``torch.save`` outputs), at least one.
        key: take the state_dict from ``checkpoint[key]``; default: auto-detect
            (see :func:`extract_state_dict`). A sequence gives one key per path (a path may
            then come more than once, e.g. for several state_dicts stored in one file).
        prefix: keep only the entries whose name starts with it.
        strip_prefix: remove ``prefix`` from the kept names (e.g. ``module.``
            of a DDP or ``AveragedModel`` state_dict).
        weights: one finite non-negative weight per checkpoint (normalized; their
            sum must be positive and finite); default equal.
        signed: the weights are the coefficients of a weighted sum, used as they are: any
            finite sign, not normalized (post-hoc EMA reconstruction's least-squares
            coefficients). The sum is accumulated in fp32 (fp64 for fp64 entries).
        progress: show a tqdm bar.
        load: reads one file (default ``torch.load(path, map_location="cpu", weights_only=True)``).

    Returns:
        A new state_dict on the CPU, in the first checkpoint's key order and
        dtypes. Integer/bool entries are the last checkpoint's.

    Raises:
        CheckpointError: bad weights, an unreadable file, a missing state_dict,
            keys/shapes/dtypes unlike the first file's, or an entry that cannot
            be averaged (sparse, quantized, nested, meta); the message names
            the file and, where there is one, the key.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise CheckpointError("no checkpoints to average: give at least one")
    weights = _normalized_weights(weights, len(paths), signed)
    keys = [key] * len(paths) if key is None or isinstance(key, str) else list(key)
    if len(keys) != len(paths):
        raise CheckpointError(f"{len(keys)} keys given for {len(paths)} checkpoints")
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
            raise _load_error(path, error) from error
        # Saved nn.Parameters (or tensors that required grad) come back as plain tensors: the average
        # is data, with no grad_fn and no requires_grad.
        state = {name: value.detach() for name, value in extract_state_dict(checkpoint, keys[index], source=path).items()}
        _check_string_keys(state, prefix, path)
        _check_entries(state, prefix, path)
        state = _select(state, prefix, strip_prefix, path)
        del checkpoint  # only `state`'s tensors stay alive, and only until the next file
        if index == 0:
            reference = {name: value.to("meta") for name, value in state.items()}
        else:
            _check_same_layout(reference, state, paths[0], path)

        weight_k = 1.0 if weights is None else weights[index]
        seen_weight += weight_k
        # lerp weight w_k / W_k; while all weights so far are 0 any value is right: copy.
        lerp_weight = weight_k / seen_weight if seen_weight > 0 else 1.0
        try:
            if signed:
                _fold_signed(accumulators, state, first=index == 0, weight=weight_k)
            else:
                _fold(accumulators, state, first=index == 0, lerp_weight=lerp_weight)
        except (RuntimeError, TypeError) as error:  # e.g. a dtype torch has no lerp for (complex32)
            raise CheckpointError(f"{path}: cannot average ({type(error).__name__}: {error})") from error
        del state  # the last reference to this checkpoint's tensors

    return {name: accumulators[name].to(reference[name].dtype) for name in reference}


def _host_tag() -> str:
    # On a filesystem shared between machines a pid only means something on the host that wrote it.
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


def _resolve_output(path: Path) -> Path:
    """The file ``open(path, "wb")`` would write: a symlink's (final) target, so the link stays a link."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops on a loop, leaving a link open() would refuse
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
    return target


def _process_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():  # 0 and negatives would signal process groups
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM), or not a pid: leave its file alone
        return True
    return True


def _remove_stale_temp_files(target: Path) -> None:
    """Remove the temporary files of ``target`` left by runs on this host whose process is gone
    (killed mid-write; each is as large as a checkpoint). Best effort: never fails the save."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return
    pattern = re.compile(re.escape(f".{target.name}.{_TEMP_TAG}-{_host_tag()}-") + r"([0-9]+)-[0-9a-f]{8}")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return  # the write reports an unusable directory
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        stale = target.parent / name
        try:
            if stat.S_ISREG(os.lstat(stale).st_mode):  # only plain files: ours are never anything else
                os.unlink(stale)
        except OSError:  # removed by a concurrent run, or not ours to remove
            pass


def _create_temp(target: Path) -> Tuple[Path, int]:
    """A new temporary file next to ``target`` and its descriptor, created with mode 0666 so that
    the kernel applies the umask (and a directory's default ACL) exactly as for ``open()``."""
    prefix = f".{target.name}.{_TEMP_TAG}-{_host_tag()}-{os.getpid()}-"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.parent / (prefix + secrets.token_hex(4))
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(target.parent))


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file in ``path``'s directory, then ``os.replace``:
    readers see the old file or the complete new one, never a partial one.

    Otherwise as ``torch.save(obj, path)``: a new file gets ``0666 & ~umask``, an
    existing one keeps its permission bits and is refused (``PermissionError``) when
    ``open()`` would refuse to write it, and a symlink is written through (its target
    is replaced; the link stays). An existing directory, FIFO or device is refused
    (``OSError``) rather than replaced by a regular file. Stale temporary files of earlier killed runs for
    this output (see :func:`_remove_stale_temp_files`) are removed first.
    """
    target = _resolve_output(Path(path))
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        existing = None
    # os.replace would put a regular file where a directory, FIFO or device (-o /dev/null as root) was.
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        raise OSError(errno.EINVAL, "not a regular file: the average is written to a regular or a new file", str(target))
    # open(path, "wb") would fail on a read-only file: do not bypass that by replacing it.
    if existing is not None and not os.access(target, os.W_OK):
        mode = stat.S_IMODE(existing.st_mode)
        raise PermissionError(errno.EACCES, f"{os.strerror(errno.EACCES)} (mode {mode:04o})", str(target))
    _remove_stale_temp_files(target)
    tmp, handle = _create_temp(target)
    try:
        with os.fdopen(handle, "wb") as file:
            if existing is not None:
                # Writing in place keeps the mode; the kernel would clear set-id bits on the write.
                os.fchmod(file.fileno(), stat.S_IMODE(existing.st_mode) & 0o777)
            try:
                torch.save(obj, file)
            except RuntimeError as error:
                hidden = _os_error_behind(error)
                if hidden is None:
                    raise
                raise OSError(hidden.errno, hidden.strerror or str(hidden), str(target)) from None
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _os_error_behind(error: BaseException) -> Optional[OSError]:
    """The OSError (a full disk, a quota, an I/O error) that a torch.save failure hides: torch's zip
    writer reports it, then fails again closing the archive with a C++ ``enforce fail``, which is
    what propagates; the OSError is in the exception's context."""
    seen = error.__context__ or error.__cause__
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__context__ or seen.__cause__
    return None


def add_arguments(parser: Any) -> None:
    """The ``average`` subcommand's options."""
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files to average")
    parser.add_argument("-o", "--output", required=True, help="where to write the averaged state_dict")
    parser.add_argument("--key", help=f"take the state_dict from checkpoint[KEY] (default: auto: {', '.join(COMMON_KEYS)})")
    parser.add_argument("--prefix", help="keep only the keys starting with PREFIX")
    parser.add_argument("--strip-prefix", action="store_true", help="remove PREFIX from the kept keys (e.g. module.)")
    parser.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="one weight per checkpoint (finite, >= 0, positive sum)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    parser.epilog = (
        "Reads torch.save files, loading only tensors and plain containers (never pickled objects, whose "
        f"loading can run code): a checkpoint holding a pickled class is refused; re-save its weights with {RESAVE}. "
        "Sparse, quantized, nested and meta entries cannot be averaged and are refused with the file and the key: "
        "save them dense (to_dense()) or dequantized (dequantize()), or select the other entries with --prefix "
        "(another state_dict with --key). The output is replaced atomically with torch.save's permissions "
        "(0666 & ~umask, or the existing file's mode); a symlinked output is written through to its target. "
        "Temporary files (.OUTPUT.swa_fast-tmp-HOST-PID-*) left by a killed run are removed by the next run."
    )


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
