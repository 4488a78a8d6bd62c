"""Distributed update_bn and AveragedModel over DDP: two gloo ranks on CPU (tests/distributed_worker.py)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from swa_fast import swa_utils

import distributed_worker as worker
from helpers import run_ranks

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs the two ranks once (a few seconds) and returns what each wrote."""
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(Path(__file__).with_name("distributed_worker.py"), [str(out)], WORLD, timeout=90)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def single_process_bn(averaged_state, batch_indices):
    """update_bn in this process (no process group) over the given batches of the data, in order."""
    model = worker.make_model()
    model.load_state_dict(averaged_state)
    data = worker.batches(seed=2, count=8)
    swa_utils.update_bn([data[i] for i in batch_indices], model)
    return worker.bn_buffers(model)


def assert_buffers_close(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        if expected[key].is_floating_point():
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
        else:
            assert torch.equal(actual[key], expected[key]), key


def test_averaged_parameters_identical_on_all_ranks(ranks):
    first, second = ranks
    assert len(first["params"]) == len(second["params"]) > 0
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scenario", list(worker.SCENARIOS))
def test_update_bn_all_reduce_equals_single_process(ranks, scenario):
    shards = worker.SCENARIOS[scenario]
    expected = single_process_bn(ranks[0]["averaged_state"], sorted(shards[0] + shards[1]))
    # Ghost BN counts its 2 ghosts per batch as batches: 8 batches -> 16.
    assert expected["4.num_batches_tracked"] == 16 and expected["1.num_batches_tracked"] == 8
    for rank in range(WORLD):
        assert_buffers_close(ranks[rank][scenario], expected)


@pytest.mark.parametrize("scenario", list(worker.SCENARIOS))
def test_update_bn_all_reduce_false_keeps_the_shard(ranks, scenario):
    shards = worker.SCENARIOS[scenario]
    everything = single_process_bn(ranks[0]["averaged_state"], sorted(shards[0] + shards[1]))
    for rank in range(WORLD):
        local = ranks[rank][scenario + "/local"]
        assert_buffers_close(local, single_process_bn(ranks[0]["averaged_state"], shards[rank]))
        if shards[rank] != list(range(8)):
            assert not torch.allclose(local["1.running_mean"], everything["1.running_mean"])


def test_all_reduce_true_needs_a_process_group():
    assert not dist.is_initialized()
    model = worker.make_model()
    with pytest.raises(RuntimeError, match=r"all_reduce=True\) needs an initialized"):
        swa_utils.update_bn([torch.randn(8, 6)], model, all_reduce=True)
    assert int(model[1].num_batches_tracked) == 0  # refused before the pass
