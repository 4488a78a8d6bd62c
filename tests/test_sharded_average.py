"""WeightAverage over FSDP2 (fully_shard) on 2 and 4 gloo ranks, HSDP on a 2x2 mesh and DDP on 2, against a
one-process reference over the same trajectory (tests/sharded_worker.py runs the ranks)."""

from pathlib import Path

import pytest
import sharded_worker as worker
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from swa_fast import WeightAverage, swa_utils

from helpers import run_ranks

WORKER = Path(__file__).with_name("sharded_worker.py")
BN_TOLERANCE = {"float32": 1e-6, "bfloat16": 1e-2}


def launch(mode, out, world, dtype="float32"):
    run_ranks(WORKER, [mode, str(out), dtype], world)
    return [torch.load(out / f"{mode}-rank{rank}.pt", weights_only=True) for rank in range(world)]


@pytest.fixture(scope="module", params=[("fsdp", 2, "float32"), ("fsdp", 2, "bfloat16"), ("fsdp", 4, "float32"),
                                        ("fsdp", 4, "bfloat16"), ("hsdp", 4, "float32")],
                ids=lambda p: f"{p[0]}-{p[1]}ranks-{p[2]}")
def fsdp_run(request, tmp_path_factory):
    mode, world, dtype = request.param
    out = tmp_path_factory.mktemp(f"{mode}{world}{dtype}")
    return world, dtype, out, launch(mode, out, world, dtype)


def one_process(trajectory, dtype_name, kind):
    """The reference: the same averages of an unsharded model through the recorded trajectory."""
    dtype = worker.DTYPES[dtype_name]
    model = worker.make_model(dtype)
    average = WeightAverage(model, **worker.averages(dtype)[kind])
    for full in trajectory:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(full[name])
        average.update(model)
    return model, average


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_sharded_averages_equal_one_process(fsdp_run, kind):
    _, dtype, _, ranks = fsdp_run
    _, reference = one_process(ranks[0]["trajectory"], dtype, kind)
    expected = reference.state_dict()["averages"]
    for result in ranks:
        assert result[kind + "/n_averaged"] == worker.STEPS
        for name, full in result[kind].items():
            assert full.dtype == torch.float32, name
            if kind == "ema":
                assert torch.equal(full, expected[name]), name
            else:
                torch.testing.assert_close(full, expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_multi_average_of_shards_equals_separate_averages_bitwise(fsdp_run):
    for result in fsdp_run[3]:
        for kind in ("swa", "ema"):
            assert result[f"multi_{kind}/n_averaged"] == worker.STEPS
            assert result[f"multi_{kind}/local_numel"] == result["param_local_numel"]
            for name, full in result[kind].items():
                assert torch.equal(result[f"multi_{kind}"][name], full), (kind, name)


def test_an_average_made_before_fully_shard_follows_the_shards(fsdp_run):
    for result in fsdp_run[3]:
        assert result["early/local_numel"] == result["param_local_numel"]
        for name, full in result["ema"].items():
            assert torch.equal(result["early"][name], full), name


def test_a_post_hoc_snapshot_of_shards_is_the_one_process_snapshot(fsdp_run):
    """PowerFunctionEMA on the shards; the snapshot gathers every shard and only rank 0 writes it."""
    from swa_fast.posthoc import PowerFunctionEMA

    _, dtype, out, ranks = fsdp_run
    assert [r["snapshot_written"] for r in ranks] == [True] + [False] * (len(ranks) - 1)
    model = worker.make_model(worker.DTYPES[dtype])
    reference = PowerFunctionEMA(model, stds=worker.POSTHOC_STDS, use_buffers=False, avg_dtype=torch.float32)
    for step, full in enumerate(ranks[0]["trajectory"], start=1):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(full[name])
        reference.update(model, step)
    expected = reference.snapshot_state()
    written = torch.load(out / "posthoc-snapshot.pt", weights_only=True)
    assert written["swa_fast.posthoc"] == expected["swa_fast.posthoc"]
    for index in range(len(worker.POSTHOC_STDS)):
        for key, value in expected[f"profile_{index}"].items():
            assert torch.equal(written[f"profile_{index}"][key], value), (index, key)


def test_a_nan_in_one_ranks_shard_makes_every_rank_skip(fsdp_run):
    _, dtype, _, ranks = fsdp_run
    kept = [full for step, full in enumerate(ranks[0]["trajectory"]) if step != worker.POISONED_STEP]
    _, reference = one_process(kept, dtype, "ema")
    for result in ranks:
        assert result["ema_skip/n_averaged"] == worker.STEPS - 1 and result["ema_skip/n_skipped"] == 1
        for name, expected in reference.state_dict()["averages"].items():
            assert torch.equal(result["ema_skip"][name], expected), name


def test_each_rank_stores_only_its_shard(fsdp_run):
    ranks = fsdp_run[3]
    full_numel = {name: t.numel() for name, t in ranks[0]["swa"].items()}
    for kind in ("swa", "ema", "late"):  # late: made after an evaluation forward
        assert all(r[kind + "/local_numel"] == r["param_local_numel"] for r in ranks)
        for name, numel in full_numel.items():  # HSDP: each shard on two ranks
            assert sum(r[kind + "/local_numel"][name] for r in ranks) == numel * ranks[0]["replicas"]
            assert max(r[kind + "/local_numel"][name] for r in ranks) < numel  # sharded, not replicated


def test_swapped_into_runs_the_sharded_forward_on_the_averages(fsdp_run):
    _, dtype, _, ranks = fsdp_run
    probe = torch.linspace(-1, 1, 12).reshape(2, 6).to(worker.DTYPES[dtype])
    for result in ranks:
        model, reference = one_process(result["trajectory"], dtype, "ema")
        reference.copy_to(model)
        model.load_state_dict(result["buffers"], strict=False)  # this rank's BN statistics (not synced)
        model.eval()
        assert torch.equal(result["swapped_output"], model(probe))
        assert result["restored"] and result["restored_after_bn"] and result["buffers_restored"]


def test_update_bn_inside_swapped_into_uses_every_ranks_data(fsdp_run):
    world, dtype, _, ranks = fsdp_run
    model, reference = one_process(ranks[0]["trajectory"], dtype, "ema")
    reference.copy_to(model)
    data = [x for rank in range(world) for x in worker.batches(2, 3, rank, worker.DTYPES[dtype])]
    swa_utils.update_bn(data, model)
    for result in ranks:
        for name, expected in model.named_buffers():
            actual = result["bn_inside"][name]
            if expected.is_floating_point():
                tolerance = BN_TOLERANCE[dtype]
                torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=name)
            else:
                assert torch.equal(actual, expected), name


def test_averaged_model_of_an_fsdp_model_names_weight_average(fsdp_run):
    for result in fsdp_run[3]:
        assert "WeightAverage" in result["averaged_model_error"]
        assert "fully_shard" in result["averaged_model_error"]


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp2")
    return out, launch("fsdp", out, 2)


def test_checkpoint_from_two_ranks_loads_on_four(saved_on_two):
    out, saved = saved_on_two
    for result in launch("load", out, 4):
        for kind in ("swa", "ema"):
            assert result[kind + "/n_averaged"] == worker.STEPS
            for name, full in saved[0][kind].items():
                assert torch.equal(result[kind][name], full), (kind, name)


def test_checkpoint_from_two_ranks_loads_in_one_unsharded_process(saved_on_two):
    out, saved = saved_on_two
    assert not dist.is_initialized()
    made = {kind: WeightAverage(worker.make_model(), **kwargs)
            for kind, kwargs in worker.averages(torch.float32).items()}
    state = {kind: average.state_dict() for kind, average in made.items()}
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    for kind, average in made.items():
        average.load_state_dict(state[kind])
        assert average.n_averaged.item() == worker.STEPS
        for name, loaded in average.state_dict()["averages"].items():
            assert torch.equal(loaded, saved[0][kind][name]), (kind, name)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return launch("ddp", tmp_path_factory.mktemp("ddp"), 2)


def test_ddp_averages_identical_on_every_rank_and_restored(ddp_run):
    first, second = ddp_run
    assert first["n_averaged"] == second["n_averaged"] == worker.STEPS
    assert list(first["averages"]) == [name for name, _ in worker.make_model().named_parameters()]  # DDP unwrapped
    assert first["multi_equal"] and second["multi_equal"]  # MultiAverage of a DDP model: bitwise separate averages
    for name, average in first["averages"].items():
        assert torch.equal(average, second["averages"][name]), name
    for name, buffer in first["bn_inside"].items():
        assert torch.equal(buffer, second["bn_inside"][name]), name  # update_bn all-reduced
    assert first["restored"] and second["restored"]


def test_the_readme_example_runs_on_two_ranks(tmp_path, capfd):
    run_ranks(Path(__file__).parents[1] / "examples" / "sharded_average.py",
              ["--steps", "20", "--checkpoint", str(tmp_path / "ema")], 2)
    printed = capfd.readouterr().out
    assert "EMA of 20 updates" in printed and "saved with torch.distributed.checkpoint" in printed
    assert (tmp_path / "ema" / ".metadata").exists()


def test_host_averages_of_a_gpu_mesh_get_a_cpu_twin_of_the_mesh(tmp_path):
    """Host (offloaded) averages of a model sharded on GPUs are DTensors on a CPU mesh over the same
    ranks, so full_tensor() and checkpoint resharding run on gloo, not NCCL with host tensors."""
    for result in launch("host_mesh", tmp_path, 2):
        for label in ("from_group", "new_gloo_groups"):
            got = result[label]
            assert got["mesh_is_host"] and got["shares_storage"] and got["loads_back"], label
            assert torch.equal(got["full"], result["expected"]), label
