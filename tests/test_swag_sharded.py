"""SWAG over FSDP2 shards and DDP on 2 gloo ranks against one process (tests/swag_worker.py runs
the ranks): the moments and deviations of shards are the unsharded ones, a sample is one coherent
model (the unsharded model's sample for the same generator seed), and a checkpoint of shards loads
in one process."""

from pathlib import Path

import pytest
import swag_worker as worker
import torch
import torch.distributed.checkpoint as dcp

from swa_fast.swag import SWAG

from helpers import run_ranks

WORKER = Path(__file__).with_name("swag_worker.py")


def launch(mode, out, world=2):
    run_ranks(WORKER, [mode, str(out)], world)
    return [torch.load(out / f"{mode}-rank{rank}.pt", weights_only=True) for rank in range(world)]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("swag_fsdp")
    return out, launch("fsdp", out)


def one_process():
    model = worker.make_model()
    swag = SWAG(model, max_rank=worker.MAX_RANK)
    for step in range(worker.STEPS):
        values = worker.trajectory(step, model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(values[name])
        swag.collect(model)
    return model, swag


def test_sharded_moments_equal_one_process(fsdp_run):
    _, ranks = fsdp_run
    model, swag = one_process()
    state = swag.state_dict()
    total = sum(p.numel() for p in model.parameters())
    assert sum(r["local_numel"] for r in ranks) == total  # each rank holds only its shards
    for result in ranks:
        for key in ("mean", "variance"):
            for name, value in state[key].items():
                torch.testing.assert_close(result[key][name], value, rtol=0, atol=1e-6, msg=f"{key} {name}")
        for column, values in state["deviations"].items():
            for name, value in values.items():
                torch.testing.assert_close(result["deviations"][column][name], value, rtol=0, atol=1e-6)
        for name, value in state["mean"].items():
            torch.testing.assert_close(result["early_mean"][name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,seed,cov", [("sample_cov", 11, True), ("sample_diag", 12, False)])
def test_a_sharded_sample_is_the_one_process_sample(fsdp_run, kind, seed, cov):
    _, ranks = fsdp_run
    model, swag = one_process()
    with swag.sampled_into(model, scale=0.5, cov=cov, generator=torch.Generator().manual_seed(seed)):
        expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for result in ranks:
        for name, value in expected.items():
            torch.testing.assert_close(result[kind][name], value, rtol=0, atol=1e-5, msg=name)


def test_checkpoint_of_shards_loads_in_one_process(fsdp_run):
    out, ranks = fsdp_run
    swag = SWAG(worker.make_model(), max_rank=worker.MAX_RANK)
    state = {"swag": swag.state_dict()}
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    swag.load_state_dict(state["swag"])
    assert swag.n_collected == worker.STEPS
    for name, value in swag.mean_state().items():
        assert torch.equal(value, ranks[0]["mean"][name]), name


def test_ddp_ranks_draw_one_coherent_sample(tmp_path):
    first, second = launch("ddp", tmp_path)
    for name, value in first["sample"].items():
        assert torch.equal(value, second["sample"][name]), name
    assert first["probs"].shape == (16, 5)
