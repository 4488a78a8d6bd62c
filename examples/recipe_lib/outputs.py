"""A run's output folder (``--out``): checked before anything starts, never holding two runs' files.

What a run keeps there: ``checkpoints/`` (one file per seed and arm, kept
epochs, and ``options.json``: the options the checkpoints were trained with)
and the report files (:data:`REPORT_FILES`), written atomically once the run
has finished, ``results.json`` last. So the report files describe the
checkpoints beside them or are absent: every invocation removes them before it
trains or loads anything, and an interrupted run (``--stop-after``, Ctrl-C, a
crash) has checkpoints and no ``results.json``.

:func:`check_out`, before the data loads: ``--out`` can be created and
written; ``--resume`` continues only checkpoints trained with the same options
(:func:`result_options`: those that change what the run computes), saying which
options differ; a run without ``--resume`` or ``--restart`` does not overwrite an
unfinished run. :func:`start_run`, once the data is there (rank 0): a new run
removes the previous run's files and records its options; a resumed one
removes the stale report.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

REPORT_FILES = ("results.md", "metrics.csv", "accuracy.png", "distance.png", "accuracy_vs_std.png", "reliability.png",
                "accuracy_vs_time.png", "results.json")
FINISHED = "results.json"  # written last: a run has finished when it is there
OPTIONS_FILE = "options.json"  # in checkpoints/

# Options a --resume may change, as they do not change what the run computes (every other option does, and a
# resume refuses it when it differs from the checkpoints'):
NOT_RESULTS = frozenset({
    "out", "resume", "restart",      # where the files are, how this invocation starts
    "stop_after",                    # where this invocation stops, not what the run computes
    "no_progress",                   # display only
    "device", "threads",             # where and how fast: the same computation (the last bits may move,
    "eval_batch_size",               # as between machines; the verdict says so); evaluation in eval mode
    "no_compare_torch",              # only times a shadow copy; a resume without it records "not compared"
    "seeds",                         # each seed's checkpoints stand alone: a resume may add seeds (or leave
                                     # some out); the report covers this invocation's seeds
})


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename: readers see
    the previous file or the whole new one, and an interrupted write leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def result_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that change what a run computes (all but :data:`NOT_RESULTS`), as JSON values."""
    chosen = {key: value for key, value in vars(args).items() if key not in NOT_RESULTS}
    if chosen.get("data_dir") is not None:  # the same folder however it is spelled
        chosen["data_dir"] = str(Path(chosen["data_dir"]).resolve())
    return json.loads(json.dumps(chosen, default=str))


def option_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _shown(value: Any) -> str:
    if value is None:
        return "not given"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("seed*/*.pt"))


def _check_writable(out: Path) -> None:
    """``out`` is a folder that can be written, or one that can be created: refused at once, not at the
    first checkpoint. Only a probe file is written (and removed); no folder is created."""
    try:
        if out.exists() and not out.is_dir():
            raise SystemExit(f"--out {out}: cannot be the output folder: it is a file")
        existing = out
        while not existing.exists():
            existing = existing.parent
    except OSError as error:
        raise SystemExit(f"--out {out}: cannot be read: {error.strerror} ({error.filename})") from None
    verb = "written" if existing == out else "created"
    if not existing.is_dir():
        raise SystemExit(f"--out {out}: cannot be {verb}: {existing} is a file")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise SystemExit(f"--out {out}: cannot be {verb}: writing in {existing} fails ({error.strerror})") from None


def check_out(args: argparse.Namespace) -> None:
    """Before the data loads: refuse an ``--out`` that cannot be written, a ``--resume`` whose options
    contradict the checkpoints', and a new run over an unfinished one. Reads only; writes nothing."""
    out: Path = args.out
    _check_writable(out)
    checkpoints = _checkpoints(out)
    if args.restart or not checkpoints:
        return
    if not args.resume:
        if not (out / FINISHED).exists():
            raise SystemExit(
                f"--out {out} holds an unfinished run ({len(checkpoints)} checkpoint file(s), no {FINISHED}: "
                "stopped by --stop-after, interrupted or failed): --resume continues it, --restart deletes it "
                "and starts over, or choose another --out")
        return  # a finished run: the new run replaces it (start_run)
    record = out / "checkpoints" / OPTIONS_FILE
    if not record.exists():
        raise SystemExit(f"--resume: the checkpoints in {out} have no record of the options they were trained "
                         f"with ({record} is missing), so they cannot be continued safely: --restart deletes "
                         "them and starts over")
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--resume: {record} cannot be read ({error}): --restart deletes the checkpoints and "
                         "starts over") from None
    current = result_options(args)
    differ = [key for key in sorted(recorded.keys() | current.keys()) if recorded.get(key) != current.get(key)]
    if differ:
        lines = [f"  {option_name(key)}: {_shown(recorded.get(key))} in the checkpoints, {_shown(current.get(key))} "
                 "now" for key in differ]
        advice = ("Resume with the checkpoints' values, or pass --restart instead of --resume to delete them and "
                  "start over with these options.")
        raise SystemExit("\n".join([f"--resume: the checkpoints in {out} were trained with other options:", *lines,
                                    advice]))


def start_run(args: argparse.Namespace, log: Any = print) -> None:
    """Once the data is loaded, on rank 0: a resume that has checkpoints removes the stale report (it is
    written again at the end); any other run removes the previous run's report and checkpoints and
    records its own options, so --out never holds files of two runs."""
    out: Path = args.out
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    checkpoints = _checkpoints(out)
    if args.resume and checkpoints:
        return
    if checkpoints:
        log(f"--out {out}: removing the previous run's {len(checkpoints)} checkpoint file(s)")
    folder = out / "checkpoints"
    for seed in folder.glob("seed*"):
        if seed.is_dir():
            for path in seed.iterdir():  # checkpoints and temporary files of interrupted writes
                if path.is_file():
                    path.unlink()
            _remove_if_empty(seed)
    write_atomic(folder / OPTIONS_FILE, json.dumps(result_options(args), indent=1, sort_keys=True) + "\n")


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
