"""swa_fast.parallel on 2 and 4 gloo ranks (tests/replicas_worker.py runs the ranks):
``average_replicas_`` against the float64 mean of the ranks' replicas, every rank bitwise identical
afterwards, mismatched replicas refused before anything changes, and SWAP's helpers."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from swa_fast.parallel import AccuracyThreshold, average_replicas_, leave_ddp, swap_average, worker_generator
from swa_fast.swa_utils import update_bn

from helpers import run_ranks

WORKER = Path(__file__).with_name("replicas_worker.py")
INTEGER_BUFFERS = ("bn.num_batches_tracked",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each (mode, world) run once for the module: starting gloo ranks costs seconds."""
    done = {}

    def run(mode, world):
        if (mode, world) not in done:
            out = tmp_path_factory.mktemp(f"{mode}{world}")
            run_ranks(WORKER, [mode, str(out)], world)
            done[mode, world] = [torch.load(out / f"{mode}-rank{rank}.pt", weights_only=False)
                                 for rank in range(world)]
        return done[mode, world]

    return run


def bound(values, result_dtype, world):
    """The stated rounding: world * eps of the accumulation dtype (fp32, or the tensor's own if wider)
    times the mean magnitude, plus half an ulp of the result's dtype (below fp32) at the mean."""
    accumulate = torch.float64 if result_dtype == torch.float64 else torch.float32
    magnitude = torch.stack([v.double().abs() for v in values]).mean(0)
    tolerance = world * torch.finfo(accumulate).eps * magnitude
    if torch.finfo(result_dtype).bits < 32:
        tolerance = tolerance + torch.finfo(result_dtype).eps * magnitude.max()
    return tolerance + 1e-300


def assert_is_mean(ranks, world, shares=None, keys=None):
    shares = shares or [1.0 / world] * world
    for name in keys or ranks[0]["after"]:
        if name in INTEGER_BUFFERS:
            continue
        values = [r["before"][name] for r in ranks]
        expected = sum(share * v.double() for share, v in zip(shares, values))
        result = ranks[0]["after"][name]
        error = (result.double() - expected).abs()
        assert bool((error <= bound(values, result.dtype, world)).all()), f"{name}: {error.max()}"


def assert_identical(ranks):
    for name, value in ranks[0]["after"].items():
        for rank, other in enumerate(ranks[1:], start=1):
            assert value.dtype == other["after"][name].dtype
            assert torch.equal(value, other["after"][name]), f"{name} differs on rank {rank}"


@pytest.mark.parametrize("world", [2, 4])
def test_the_average_of_the_replicas_on_every_rank(runs, world):
    ranks = runs("plain", world)
    assert_is_mean(ranks, world)
    assert_identical(ranks)
    assert ranks[0]["after"]["low"].dtype == torch.bfloat16  # averaged in fp32, stored back as bf16
    assert ranks[0]["after"]["bn.num_batches_tracked"] == 10  # integer buffers: the first rank's
    assert all(r["versions_bumped"] and r["strided_still_strided"] for r in ranks)


def test_bf16_is_averaged_in_fp32(runs):
    """Three of four bf16 replicas: a bf16 running sum would round after every addition; in fp32,
    the result is the fp32 mean rounded once, within half an ulp of the float64 mean."""
    ranks = runs("plain", 4)
    values = torch.stack([r["before"]["low"].double() for r in ranks])
    expected = values.mean(0)
    result = ranks[0]["after"]["low"].double()
    half_ulp = 2.0 ** (torch.floor(torch.log2(expected.abs())) - 8)
    assert bool(((result - expected).abs() <= half_ulp * 1.001 + 1e-6).all())


def test_weighted_average(runs):
    world = 4
    ranks = runs("weighted", world)
    weights = [r + 1.0 for r in range(world)]
    assert_is_mean(ranks, world, shares=[w / sum(weights) for w in weights])
    assert_identical(ranks)


def test_buffers_false_leaves_every_buffer(runs):
    world = 2
    ranks = runs("no_buffers", world)
    for r in ranks:
        for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
            assert torch.equal(r["after"][name], r["before"][name])
    parameters = [name for name in ranks[0]["after"] if not name.startswith("bn.running")
                  and name != "bn.num_batches_tracked"]
    assert_is_mean(ranks, world, keys=parameters)


def test_a_ddp_wrapper_is_looked_through(runs):
    ranks = runs("ddp", 2)
    assert_is_mean(ranks, 2)
    assert_identical(ranks)


def test_each_group_averages_its_own_ranks(runs):
    ranks = runs("groups", 4)
    for members in ([0, 1], [2, 3]):
        assert_is_mean([ranks[r] for r in members], 2)
        assert_identical([ranks[r] for r in members])
    assert not torch.equal(ranks[0]["after"]["fc.weight"], ranks[2]["after"]["fc.weight"])


@pytest.mark.parametrize("world", [2, 4])
def test_mismatched_replicas_are_refused_on_every_rank_before_anything_changes(runs, world):
    ranks = runs("mismatch", world)
    expected_words = {"shape": "'fc.weight'", "dtype": "dtype torch.float64", "missing": "'wide'",
                      "weights": "weights"}
    for case, words in expected_words.items():
        for rank, result in enumerate(ranks):
            message = result[case]["message"]
            assert message is not None, f"{case}: rank {rank} did not raise"
            assert "rank 1 differs from rank 0" in message and words in message, message
            assert "Nothing was modified" in message
            assert result[case]["unchanged"], f"{case}: rank {rank} was modified"


@pytest.mark.parametrize("world", [2, 4])
def test_swap_phases(runs, world):
    ranks = runs("swap", world)
    expected_accuracy = sum(r + 1 for r in range(world)) / (4 * world)
    for r in ranks:
        assert r["accuracy"] == pytest.approx(expected_accuracy)
        assert r["reached"] == (expected_accuracy >= 0.5)
        assert math.isnan(r["after_reset"])
        assert r["is_module"]
    # phase 1 under DDP: every rank the same weights (BN statistics follow each rank's last batch);
    # phase 2: each rank its own data order and weights
    for r in ranks[1:]:
        for name in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"):
            assert torch.equal(ranks[0]["start"][name], r["start"][name]), name
        assert not torch.equal(r["order"], ranks[0]["order"])
        assert not torch.equal(r["phase2"]["0.weight"], ranks[0]["phase2"]["0.weight"])
    # phase 3: the mean of the phase-2 weights, BN statistics of the averaged model over every rank's data
    averaged = {name: sum(r["phase2"][name].double() for r in ranks) / world for name in ranks[0]["phase2"]}
    for name in ("0.weight", "0.bias", "3.weight", "3.bias"):
        torch.testing.assert_close(ranks[0]["after"][name].double(), averaged[name], rtol=0, atol=1e-6)
    assert_identical(ranks)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model.load_state_dict(ranks[0]["after"])
    batches = [b for r in ranks for b in (r["x"][:12], r["x"][12:])]
    update_bn(batches, model)
    for name in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(ranks[0]["after"][name], model.state_dict()[name], rtol=1e-5, atol=1e-6)
    assert int(ranks[0]["after"]["1.num_batches_tracked"]) == 2 * world


# ----------------------------------------------------------------- in one process: no group needed


def test_without_a_process_group_the_error_says_what_is_missing():
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        average_replicas_(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        swap_average(nn.Linear(2, 2), None)


def test_accuracy_threshold_alone():
    rule = AccuracyThreshold(0.75)
    rule.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    assert rule.accuracy() == 0.5 and not rule.reached()
    rule.update(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 1, 1]))
    assert rule.reached(reset=False)  # the first batch was forgotten by reached()
    assert rule.accuracy() == 1.0  # and this one was not
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        AccuracyThreshold(95)
    with pytest.raises(ValueError, match="predictions for"):
        rule.update(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_worker_generator_is_reproducible_and_checked():
    first = torch.randperm(10, generator=worker_generator(3))
    assert torch.equal(first, torch.randperm(10, generator=worker_generator(3)))
    assert not torch.equal(first, torch.randperm(10, generator=worker_generator(4)))
    with pytest.raises(TypeError, match="seed must be an int"):
        worker_generator(1.5)


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shards_are_refused(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(nn.Linear(2, 2), mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(ValueError, match="'weight' is a DTensor"):
        average_replicas_(model)
    with pytest.raises(ValueError, match="FSDP2-sharded model"):
        leave_ddp(model)
    plain = nn.Linear(2, 2)
    assert leave_ddp(plain) is plain


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "25"])
def test_bad_arguments_are_named(one_rank_group, bad):
    with pytest.raises(ValueError, match="bucket_mb"):
        average_replicas_(nn.Linear(2, 2), bucket_mb=bad)
    with pytest.raises(ValueError, match="weights has 2 entries for a group of 1"):
        average_replicas_(nn.Linear(2, 2), weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        average_replicas_(nn.Linear(2, 2), weights=[0.0])
    with pytest.raises(ValueError, match="accumulate_dtype"):
        average_replicas_(nn.Linear(2, 2), accumulate_dtype=torch.int64)


def test_one_rank_is_its_own_average(one_rank_group):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    average_replicas_(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
