"""Checkpoint averaging (swa_fast.checkpoint_average, ``python -m swa_fast average``) against float64 means."""

import gc
import math
import os
import re
import stat
import subprocess
import sys
import weakref
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from swa_fast import checkpoint_average
from swa_fast.checkpoint_average import CheckpointError, average_checkpoints

ROOT = Path(__file__).resolve().parent.parent
COUNT = 4


def make_state(seed):
    """A state_dict with every kind of entry: fp32/bf16/fp16/fp64 floats, an int counter, a bool mask."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(100 * (seed + 1)),
        "head.weight": torch.randn(10, 8, generator=g).to(torch.bfloat16),
        "head.bias": torch.randn(10, generator=g).to(torch.float16),
        "precise": torch.randn(5, generator=g, dtype=torch.float64),
        "mask": torch.rand(6, generator=g) > 0.5,
    }


@pytest.fixture
def checkpoints(tmp_path):
    """COUNT saved state_dicts and the states themselves."""
    states = [make_state(seed) for seed in range(COUNT)]
    paths = []
    for index, state in enumerate(states):
        path = tmp_path / f"ckpt{index}.pt"
        torch.save(state, path)
        paths.append(path)
    return paths, states


def float64_mean(states, weights=None):
    weights = torch.tensor(weights or [1.0] * len(states), dtype=torch.float64)
    weights = weights / weights.sum()
    return {key: sum(w * s[key].double() for w, s in zip(weights, states)) for key in states[0]}


def assert_matches_mean(averaged, states, weights=None):
    expected = float64_mean(states, weights)
    assert list(averaged) == list(states[0])
    for key, value in averaged.items():
        assert value.dtype == states[0][key].dtype, key
        if value.is_floating_point():
            # fp32 accumulators: the result is the float64 mean rounded once to the entry's dtype (+ fp32 steps).
            tolerance = {torch.float64: 1e-12, torch.float32: 1e-6}.get(value.dtype, 1e-2)
            exact = expected[key].to(value.dtype).double()
            torch.testing.assert_close(value.double(), exact, rtol=tolerance, atol=tolerance, msg=key)
        else:
            assert torch.equal(value, states[-1][key]), key  # integer/bool: the last checkpoint's


def test_average_equals_float64_mean(checkpoints):
    paths, states = checkpoints
    assert_matches_mean(average_checkpoints(paths), states)


def test_bf16_accumulates_in_fp32(tmp_path):
    # 64 bf16 checkpoints whose mean is not representable step by step in bf16.
    states = [{"w": torch.full((4,), 1.0 + i / 64).to(torch.bfloat16)} for i in range(64)]
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"{i}.pt")
        torch.save(state, paths[-1])
    averaged = average_checkpoints(paths)["w"]
    assert torch.equal(averaged, float64_mean(states)["w"].to(torch.bfloat16))


def test_single_checkpoint_is_a_copy(checkpoints):
    paths, states = checkpoints
    averaged = average_checkpoints(paths[:1])
    for key in states[0]:
        assert torch.equal(averaged[key], states[0][key]), key


def test_weights(checkpoints):
    paths, states = checkpoints
    weights = [0.0, 1.0, 2.0, 5.0]
    assert_matches_mean(average_checkpoints(paths, weights=weights), states, weights)
    # A leading zero weight is a copy of nothing: the first checkpoint does not count.
    assert_matches_mean(average_checkpoints(paths[:2], weights=[0, 3]), states[:2], [0, 3])


@pytest.mark.parametrize("weights, message", [([1.0], "1 weights given for 4"), ([1, -1, 1, 1], ">= 0"), ([0, 0, 0, 0], "positive sum")])
def test_bad_weights(checkpoints, weights, message):
    with pytest.raises(CheckpointError, match=message):
        average_checkpoints(checkpoints[0], weights=weights)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([math.inf, math.inf, 1, 1], r"weights must be finite.*inf"),
        ([1, math.nan, 1, 1], r"weights must be finite.*nan"),
        ([1, -math.inf, 1, 1], r"weights must be finite.*-inf"),
        ([1e308, 1e308, 0, 0], r"sum of the weights overflows"),
    ],
    ids=["inf", "nan", "-inf", "sum-overflows"],
)
def test_non_finite_weights_refused(checkpoints, weights, message, monkeypatch):
    # Refused before any file is read: inf/inf (NaN) or w/inf (0) lerp weights would
    # silently make one checkpoint the "average".
    monkeypatch.setattr(checkpoint_average, "_load", lambda path: pytest.fail(f"{path} was read"))
    with pytest.raises(CheckpointError, match=message):
        average_checkpoints(checkpoints[0], weights=weights)


def test_streams_one_checkpoint_at_a_time(checkpoints, monkeypatch):
    paths, states = checkpoints
    alive = []  # weak references to the tensors of the checkpoints loaded so far
    real_load = checkpoint_average._load

    def watched_load(path):
        gc.collect()
        assert not [ref for ref in alive if ref() is not None], f"a checkpoint is still alive when {path} is loaded"
        checkpoint = real_load(path)
        alive.extend(weakref.ref(tensor) for tensor in checkpoint.values())
        return checkpoint

    monkeypatch.setattr(checkpoint_average, "_load", watched_load)
    assert_matches_mean(average_checkpoints(paths), states)
    assert len(alive) == COUNT * len(states[0])


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_common_keys_found_automatically(tmp_path, key):
    states = [make_state(seed) for seed in range(2)]
    paths = []
    for index, state in enumerate(states):
        paths.append(tmp_path / f"{index}.pt")
        torch.save({key: state, "epoch": index, "optimizer": {"lr": 0.1}}, paths[-1])
    assert_matches_mean(average_checkpoints(paths), states)


def test_explicit_key(tmp_path):
    states = [make_state(seed) for seed in range(2)]
    paths = []
    for index, state in enumerate(states):
        paths.append(tmp_path / f"{index}.pt")
        # "state_dict" would be found automatically; --key picks the EMA weights instead.
        torch.save({"state_dict": make_state(10 + index), "ema": state}, paths[-1])
    assert_matches_mean(average_checkpoints(paths, key="ema"), states)
    with pytest.raises(CheckpointError, match=r"0\.pt: has no key 'weights'"):
        average_checkpoints(paths, key="weights")


def test_prefix_and_strip_prefix(tmp_path):
    states = [make_state(seed) for seed in range(3)]
    paths = []
    for index, state in enumerate(states):
        paths.append(tmp_path / f"{index}.pt")
        wrapped = {f"module.{name}": value for name, value in state.items()}
        wrapped["n_averaged"] = torch.tensor(index)  # an AveragedModel state_dict's extra entry
        torch.save(wrapped, paths[-1])
    stripped = average_checkpoints(paths, prefix="module.", strip_prefix=True)
    assert_matches_mean(stripped, states)
    kept = average_checkpoints(paths, prefix="module.")
    assert list(kept) == [f"module.{name}" for name in states[0]]
    with pytest.raises(CheckpointError, match=r"0\.pt: no key starts with prefix 'encoder\.'"):
        average_checkpoints(paths, prefix="encoder.")


def test_model_loads_the_average(tmp_path):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)) for _ in range(3)]
    paths = []
    for index, model in enumerate(models):
        paths.append(tmp_path / f"{index}.pt")
        torch.save({"model": model.state_dict(), "epoch": index}, paths[-1])
    target = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    target.load_state_dict(average_checkpoints(paths))
    expected = torch.stack([m[0].weight.detach() for m in models]).mean(0)
    torch.testing.assert_close(target[0].weight.detach(), expected)


# -- errors name the file and the key ------------------------------------------------


def write(tmp_path, name, state):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_no_checkpoints():
    with pytest.raises(CheckpointError, match="at least one"):
        average_checkpoints([])


def test_missing_and_extra_keys(tmp_path):
    first = write(tmp_path, "a.pt", {"x": torch.zeros(2), "y": torch.zeros(2)})
    missing = write(tmp_path, "b.pt", {"x": torch.zeros(2)})
    extra = write(tmp_path, "c.pt", {"x": torch.zeros(2), "y": torch.zeros(2), "z": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"b\.pt: key 'y' \(in .*a\.pt\) is missing"):
        average_checkpoints([first, missing])
    with pytest.raises(CheckpointError, match=r"c\.pt: key 'z' is not in .*a\.pt"):
        average_checkpoints([first, extra])


def test_shape_and_dtype_mismatch(tmp_path):
    first = write(tmp_path, "a.pt", {"x": torch.zeros(2, 3)})
    shape = write(tmp_path, "b.pt", {"x": torch.zeros(3, 2)})
    dtype = write(tmp_path, "c.pt", {"x": torch.zeros(2, 3, dtype=torch.float16)})
    with pytest.raises(CheckpointError, match=r"b\.pt: key 'x' has shape \(3, 2\), .*a\.pt has \(2, 3\)"):
        average_checkpoints([first, shape])
    with pytest.raises(CheckpointError, match=r"c\.pt: key 'x' has dtype torch\.float16, .*a\.pt has torch\.float32"):
        average_checkpoints([first, dtype])


class Pickled:
    """A class of this module: torch.save pickles an instance, which weights_only loading refuses."""

    def __init__(self, value):
        self.value = value


def test_unreadable_files(tmp_path):
    good = write(tmp_path, "a.pt", {"x": torch.zeros(2)})
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a PyTorch checkpoint \(torch\.save file\): "
                                              r"cannot read it \(.*starts with b'not a checkpoint'\)\. "):
        average_checkpoints([good, garbage])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: not a PyTorch checkpoint .*the file is empty"):
        average_checkpoints([empty])
    with pytest.raises(CheckpointError, match=r"absent\.pt: cannot read checkpoint \(No such file or directory\)"):
        average_checkpoints([good, tmp_path / "absent.pt"])
    for name, obj in (("fraction.pt", Fraction(1, 3)), ("module.pt", torch.nn.Linear(2, 2))):
        unsafe = tmp_path / name
        torch.save({"x": torch.zeros(2), "obj": obj}, unsafe)  # weights_only refuses the class
        qualified = re.escape(f"{type(obj).__module__}.{type(obj).__name__}")
        with pytest.raises(CheckpointError, match=rf"{name}: a torch\.save file holding a pickled {qualified}, "):
            average_checkpoints([good, unsafe])
    # A torch.save file cut short (a copy that did not finish) is said to be one, and damaged.
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: a torch\.save file that cannot be loaded \(.*\): "
                                              r"truncated or damaged\?"):
        average_checkpoints([good, truncated])
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": torch.zeros(2), "obj": Fraction(1, 3)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pt: a torch\.save file holding a pickled fractions\.Fraction"):
        average_checkpoints([legacy])


def test_cli_text_file_is_not_a_checkpoint(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# swa_fast\n\nFused weight averaging.\n")
    result = cli(readme, "-o", tmp_path / "out.pt", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr, result.stderr
    error = result.stderr.strip()
    assert error.startswith(f"swa_fast average: error: {readme}: not a PyTorch checkpoint (torch.save file): "
                            "cannot read it ("), error
    assert "starts with b'# swa_fast" in error
    assert error.endswith(
        "). `python -m swa_fast average` reads files written by torch.save holding a state_dict "
        "(or a dict with one under state_dict/model_state_dict/model, or --key)"), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_cli_pickled_class_is_refused_for_safety(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"model": {"x": torch.zeros(2)}, "extra": Pickled(3)}, path)
    result = cli(path, "-o", tmp_path / "out.pt", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr, result.stderr
    error = " ".join(result.stderr.split())
    assert f"{path}: a torch.save file holding a pickled {Pickled.__module__}.Pickled" in error, error
    assert "for safety `python -m swa_fast average` loads only tensors and plain containers" in error
    assert error.endswith("Save the weights as a state_dict and average those: "
                          "torch.save(model.state_dict(), path)"), error


def test_no_state_dict_found(tmp_path):
    path = write(tmp_path, "a.pt", {"epoch": 3, "lr": 0.1})
    with pytest.raises(CheckpointError, match=r"a\.pt: no state_dict found"):
        average_checkpoints([path])
    path = write(tmp_path, "b.pt", {"model": {"x": torch.zeros(1), "note": "text"}})
    with pytest.raises(CheckpointError, match=r"b\.pt: entry 'note' of 'model' is a str"):
        average_checkpoints([path], key="model")
    path = write(tmp_path, "c.pt", {"model": {}})
    with pytest.raises(CheckpointError, match=r"c\.pt: 'model' is an empty state_dict"):
        average_checkpoints([path], key="model")


# The kinds of entry that cannot be averaged; each is refused with the file and the key.
UNSUPPORTED_ENTRIES = {
    "sparse_coo": lambda: torch.eye(3).to_sparse(),
    "sparse_csr": lambda: torch.eye(3).to_sparse_csr(),
    "sparse_csc": lambda: torch.eye(3).to_sparse_csc(),
    "quantized": lambda: torch.quantize_per_tensor(torch.randn(3, 3), 0.1, 0, torch.qint8),
    "quantized_per_channel": lambda: torch.quantize_per_channel(
        torch.randn(3, 3), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 0, 0]), 0, torch.quint8
    ),
    "meta": lambda: torch.empty(3, 3, device="meta"),
    "nested": lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
}
UNSUPPORTED_MESSAGES = {
    "sparse_coo": r"sparse tensor \(torch\.sparse_coo\).*to_dense\(\)",
    "sparse_csr": r"sparse tensor \(torch\.sparse_csr\).*to_dense\(\)",
    "sparse_csc": r"sparse tensor \(torch\.sparse_csc\).*to_dense\(\)",
    "quantized": r"quantized tensor \(torch\.qint8\).*dequantize\(\)",
    "quantized_per_channel": r"quantized tensor \(torch\.quint8\).*dequantize\(\)",
    "meta": r"meta tensor.*no data",
    "nested": r"nested tensor",
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED_ENTRIES))
def test_unsupported_entries_name_file_and_key(tmp_path, kind):
    dense = write(tmp_path, "dense.pt", {"w": torch.zeros(3, 3), "odd": torch.zeros(3, 3)})
    odd = write(tmp_path, "odd.pt", {"w": torch.ones(3, 3), "odd": UNSUPPORTED_ENTRIES[kind]()})
    message = UNSUPPORTED_MESSAGES[kind]
    # In a later file (first one dense) and in the first file, and alone.
    with pytest.raises(CheckpointError, match=rf"odd\.pt: key 'odd' is a {message}"):
        average_checkpoints([dense, odd])
    with pytest.raises(CheckpointError, match=rf"odd\.pt: key 'odd' is a {message}"):
        average_checkpoints([odd, dense])
    with pytest.raises(CheckpointError, match=rf"odd\.pt: key 'odd' is a {message}"):
        average_checkpoints([odd])
    # The way out the message suggests: select the other entries.
    wrapped = write(tmp_path, "wrapped.pt", {"model.w": torch.ones(3, 3), "extra.odd": UNSUPPORTED_ENTRIES[kind]()})
    other = write(tmp_path, "other.pt", {"model.w": torch.zeros(3, 3), "extra.odd": torch.zeros(3, 3)})
    averaged = average_checkpoints([wrapped, other], prefix="model.")
    torch.testing.assert_close(averaged["model.w"], torch.full((3, 3), 0.5))


def test_unsupported_entry_under_a_key_names_the_state_dict_key(tmp_path):
    path = write(tmp_path, "a.pt", {"model": {"w": torch.zeros(2), "emb": torch.eye(2).to_sparse()}, "epoch": 1})
    with pytest.raises(CheckpointError, match=r"a\.pt: key 'emb' is a sparse tensor"):
        average_checkpoints([path], key="model")


def test_failure_while_folding_names_the_file(tmp_path, monkeypatch):
    # Anything the fold itself refuses (a dtype torch has no lerp for, ...) still names the file.
    first = write(tmp_path, "a.pt", {"w": torch.zeros(2)})
    second = write(tmp_path, "b.pt", {"w": torch.ones(2)})
    real_fold = checkpoint_average._fold

    def failing_fold(accumulators, state, *, first, lerp_weight):
        if not first:
            raise NotImplementedError("no kernel for this")
        real_fold(accumulators, state, first=first, lerp_weight=lerp_weight)

    monkeypatch.setattr(checkpoint_average, "_fold", failing_fold)
    with pytest.raises(CheckpointError, match=r"b\.pt: cannot average \(NotImplementedError: no kernel for this\)"):
        average_checkpoints([first, second])


# -- atomic write and the CLI ------------------------------------------------------------


def test_save_atomic_leaves_old_file_on_error(tmp_path, monkeypatch):
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")

    def failing_save(obj, file):
        file.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint_average.torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint_average.save_atomic({"x": torch.zeros(1)}, out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]  # no temporary file left


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_save_atomic_new_file_mode_is_torch_saves(tmp_path, umask, mask):
    umask(mask)
    reference = tmp_path / "reference.pt"
    torch.save({"x": torch.zeros(1)}, reference)
    out = tmp_path / "out.pt"
    checkpoint_average.save_atomic({"x": torch.zeros(1)}, out)
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("mode", [0o640, 0o664, 0o600], ids=oct)
def test_save_atomic_keeps_an_existing_files_mode(tmp_path, umask, mode):
    umask(0o077)  # would give 0600 to a new file
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    out.chmod(mode)
    checkpoint_average.save_atomic({"x": torch.ones(1)}, out)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert torch.equal(torch.load(out, weights_only=True)["x"], torch.ones(1))


def test_save_atomic_refuses_an_output_open_would_refuse(tmp_path, monkeypatch):
    # A read-only output: open(path, "wb") (torch.save) fails for a non-root user, so
    # replacing the file behind it would bypass the protection. Root may write it.
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    out.chmod(0o444)
    if os.geteuid() == 0:  # root: access() says yes; play an ordinary user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode, **kw))
    with pytest.raises(PermissionError, match="out.pt"):
        checkpoint_average.save_atomic({"x": torch.ones(1)}, out)
    assert out.read_bytes() == b"old" and stat.S_IMODE(out.stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


def test_save_atomic_refuses_a_non_regular_output(tmp_path):
    # open() would write into a FIFO or device, or fail on a directory; replacing any of
    # them with a regular file (e.g. -o /dev/null as root) is never what was asked.
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    directory = tmp_path / "dir.pt"
    directory.mkdir()
    for out in (fifo, directory):
        with pytest.raises(OSError, match=re.escape(out.name)):
            checkpoint_average.save_atomic({"x": torch.ones(1)}, out)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and directory.is_dir() and not any(directory.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.pt", "pipe.pt"]


def test_save_atomic_writes_through_a_symlink(tmp_path):
    real_dir = tmp_path / "store"
    real_dir.mkdir()
    target = real_dir / "real.pt"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "out.pt"
    link.symlink_to(os.path.join("store", "real.pt"))  # relative, as `ln -s` makes them
    chain = tmp_path / "latest.pt"
    chain.symlink_to("out.pt")  # a link to the link
    checkpoint_average.save_atomic({"x": torch.ones(1)}, chain)
    assert chain.is_symlink() and os.readlink(chain) == "out.pt"
    assert link.is_symlink() and os.readlink(link) == os.path.join("store", "real.pt")
    assert not target.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(1))
    assert sorted(p.name for p in real_dir.iterdir()) == ["real.pt"]
    # A dangling link: the target is created, as open() would.
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(real_dir / "new.pt")
    checkpoint_average.save_atomic({"x": torch.zeros(1)}, dangling)
    assert dangling.is_symlink()
    assert torch.equal(torch.load(real_dir / "new.pt", weights_only=True)["x"], torch.zeros(1))


def test_save_atomic_refuses_a_symlink_loop(tmp_path):
    (tmp_path / "a.pt").symlink_to("b.pt")
    (tmp_path / "b.pt").symlink_to("a.pt")
    with pytest.raises(OSError, match="symbolic links"):
        checkpoint_average.save_atomic({"x": torch.zeros(1)}, tmp_path / "a.pt")
    assert os.readlink(tmp_path / "a.pt") == "b.pt" and os.readlink(tmp_path / "b.pt") == "a.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_save_atomic_removes_stale_temp_files_of_dead_processes(tmp_path, monkeypatch):
    out = tmp_path / "out.pt"
    seen = []
    real_save = torch.save

    def watching_save(obj, file):
        seen.extend(p.name for p in tmp_path.iterdir())
        real_save(obj, file)

    monkeypatch.setattr(checkpoint_average.torch, "save", watching_save)
    checkpoint_average.save_atomic({"x": torch.zeros(1)}, out)
    monkeypatch.setattr(checkpoint_average.torch, "save", real_save)
    # The temporary file is recognisable: output name, tag, host, pid, random part.
    assert len(seen) == 1
    own = re.fullmatch(rf"\.out\.pt\.swa_fast-tmp-(.+)-{os.getpid()}-([0-9a-f]{{8}})", seen[0])
    assert own, seen

    def temp_name(pid, output="out.pt", host=own.group(1), random="0123abcd"):
        return f".{output}.swa_fast-tmp-{host}-{pid}-{random}"

    dead = dead_pid()
    stale = [temp_name(dead), temp_name(dead, random="ffffffff")]
    kept = [
        temp_name(os.getpid()),  # this process: alive
        temp_name(os.getppid()),  # the parent: alive
        temp_name(dead, output="other.pt"),  # another output's
        temp_name(dead, host=own.group(1) + "x"),  # another machine's (shared filesystem): its pid means nothing here
        temp_name(dead, random="xyz"),  # not our naming
        temp_name(dead) + ".bak",
        ".out.pt.k2j4h5g6.tmp",  # tempfile's naming: no pid to judge by
        "out.pt.swa_fast-tmp-x",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / temp_name(dead, random="aaaaaaaa")).mkdir()  # not a file: left alone
    kept.append(temp_name(dead, random="aaaaaaaa"))
    checkpoint_average.save_atomic({"x": torch.ones(1)}, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out.pt"])
    assert torch.equal(torch.load(out, weights_only=True)["x"], torch.ones(1))


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "swa_fast", "average", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_cli_end_to_end(checkpoints, tmp_path):
    paths, states = checkpoints
    out = tmp_path / "averaged.pt"
    result = cli(*paths, "-o", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"averaged {COUNT} checkpoints" in result.stdout
    assert_matches_mean(torch.load(out, weights_only=True), states)

    result = cli(*paths, "--weights", 0, 1, 2, 5, "-o", out, "--quiet", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert_matches_mean(torch.load(out, weights_only=True), states, [0, 1, 2, 5])


def test_cli_key_and_prefix(tmp_path):
    states = [make_state(seed) for seed in range(2)]
    paths = [write(tmp_path, f"{i}.pt", {"ema": {f"module.{k}": v for k, v in s.items()}}) for i, s in enumerate(states)]
    out = tmp_path / "out.pt"
    result = cli(*paths, "--key", "ema", "--prefix", "module.", "--strip-prefix", "-o", out, "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_matches_mean(torch.load(out, weights_only=True), states)


def test_cli_error_writes_nothing(tmp_path):
    first = write(tmp_path, "a.pt", {"x": torch.zeros(2)})
    second = write(tmp_path, "b.pt", {"y": torch.zeros(2)})
    out = tmp_path / "out.pt"
    result = cli(first, second, "-o", out, cwd=tmp_path)
    assert result.returncode == 1
    assert "swa_fast average: error:" in result.stderr and "b.pt" in result.stderr and "'x'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]
    result = cli(first, "--strip-prefix", "-o", out, cwd=tmp_path)
    assert result.returncode == 1 and "--strip-prefix needs --prefix" in result.stderr


def test_cli_non_finite_weights_write_nothing(checkpoints, tmp_path):
    paths, _ = checkpoints
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    for weights in (["inf"] * COUNT, ["1e308"] * COUNT, ["nan"] * COUNT):
        result = cli(*paths[:2], *paths[2:], "--weights", *weights, "-o", out, cwd=tmp_path)
        assert result.returncode == 1, result.stdout
        assert "swa_fast average: error:" in result.stderr and "Traceback" not in result.stderr
        assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in paths] + ["out.pt"])


def test_cli_unsupported_entry_writes_nothing(tmp_path):
    first = write(tmp_path, "a.pt", {"x": torch.zeros(2, 2), "q": torch.zeros(2, 2)})
    quantized = torch.quantize_per_tensor(torch.ones(2, 2), 0.1, 0, torch.qint8)
    second = write(tmp_path, "b.pt", {"x": torch.ones(2, 2), "q": quantized})
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    result = cli(first, second, "-o", out, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "b.pt: key 'q' is a quantized tensor" in result.stderr, result.stderr
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "out.pt"]


def test_cli_help_documents_refused_entries():
    result = subprocess.run(
        [sys.executable, "-m", "swa_fast", "average", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.lower().split())
    for phrase in ("sparse", "quantized", "meta", "--prefix", "finite"):
        assert phrase in text, phrase
