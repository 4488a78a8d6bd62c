"""weight_distance and WeightDistanceTracker over FSDP2 (1-D mesh on 2 and 4 gloo ranks) and HSDP
(a 2x2 replicate x shard mesh), against one process replaying the same trajectory
(tests/sharded_distance_worker.py runs the ranks)."""

from pathlib import Path

import pytest
import sharded_worker
import torch

from swa_fast.distance import WeightDistanceTracker, weight_distance

from helpers import run_ranks

WORKER = Path(__file__).with_name("sharded_distance_worker.py")


@pytest.fixture(scope="module", params=[("fsdp", 2), ("fsdp", 4), ("hsdp", 4)], ids=lambda p: f"{p[0]}-{p[1]}ranks")
def ranks(request, tmp_path_factory):
    mode, world = request.param
    out = tmp_path_factory.mktemp(f"{mode}{world}")
    run_ranks(WORKER, [mode, str(out)], world)
    return [torch.load(out / f"{mode}-rank{rank}.pt", weights_only=True) for rank in range(world)]


def one_process(start, trajectory):
    """The same distances of an unsharded model through the recorded trajectory."""
    model = sharded_worker.make_model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(start[name])
    tracker = WeightDistanceTracker(model)
    for step, full in enumerate(trajectory, start=1):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(full[name])
        tracker.update(step)
    return model, tracker


def assert_rows_close(rows, expected):
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for column, value in want.items():
            assert row[column] == pytest.approx(value, rel=1e-5, abs=1e-7), column


def test_tracker_equals_one_process(ranks):
    _, reference = one_process(ranks[0]["start"], ranks[0]["trajectory"])
    for result in ranks:
        assert_rows_close(result["history"], reference.history)
        assert_rows_close(result["from_full"], reference.history)  # w_0 given as full tensors
        assert result["history"] == ranks[0]["history"]  # every rank records the same bits
    assert ranks[0]["history"][-1]["total"] > 0


def test_tracker_made_after_an_evaluation_forward_measures_the_shards(ranks):
    """Made while FSDP2 left the root gathered: its w_0 is still this rank's shards, and what it
    measures matches the one-process reference (here w_0 equals the start)."""
    _, reference = one_process(ranks[0]["start"], ranks[0]["trajectory"])
    for result in ranks:
        assert_rows_close(result["late"], reference.history)


def test_the_snapshot_holds_only_this_ranks_shards(ranks):
    full = [t.numel() for t in ranks[0]["start"].values()]
    for result in ranks:
        assert result["snapshot_numel"] == result["param_local_numel"]
    shards = [sum(column) for column in zip(*(r["snapshot_numel"] for r in ranks))]
    assert shards == [n * ranks[0]["replicas"] for n in full]


def test_weight_distance_of_sharded_models(ranks):
    model, _ = one_process(ranks[0]["start"], ranks[0]["trajectory"])
    start = list(ranks[0]["start"].values())
    want = weight_distance(model, start, per_tensor=True)
    for result in ranks:
        per_tensor, total = result["between_models"]
        torch.testing.assert_close(per_tensor, want.per_tensor, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(total, want.total, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result["norm"], weight_distance(model), rtol=1e-5, atol=1e-7)


def test_clear_errors(ranks):
    for result in ranks:
        assert "b[0] is not sharded like a[0] (a plain tensor vs placements" in result["mismatch"]
        assert "tensor 0 has a Partial placement" in result["partial"]
