"""The CUDA multi-tensor harness's launch planning, checked on the CPU.

``plan_launches`` (csrc/launch_plan.h) decides which chunks of which tensors
every launch of a multi_tensor_apply call works on and packs the metadata its
kernel receives. It is plain host code, compiled into every build, so these
tests check the exact plans the GPU would launch without a GPU: sizes are
numbers (fake addresses, nothing allocated), so tensors of billions of
elements cost nothing. Both kernel-argument budgets (4 KB, 32 KB) and every
list depth (1 to 9: multi_average_ walks up to 8 averages plus current) are
checked whatever the build chose.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import swa_fast
from swa_fast.ops import launch_plan as planner

BUDGETS = [4096, 32768]
DEPTHS = list(range(1, 10))
CHUNK = planner.launch_limits(4096)["chunk_size"]


def limits(arg_bytes: int, depth: int) -> tuple[int, int]:
    info = planner.launch_limits(arg_bytes)
    return info["max_blocks"], info["max_tensors"][depth - 1]


def check_plan(numels: list[int], depth: int, arg_bytes: int) -> list[dict]:
    """Plans the launches and asserts every invariant the kernels rely on; returns the plan."""
    launches = planner.plan_launches(numels, depth, arg_bytes)
    max_blocks, max_tensors = limits(arg_bytes, depth)

    # Every (tensor, chunk) exactly once, in list order; empty tensors nowhere.
    expected = [(t, c) for t, n in enumerate(numels) for c in range(math.ceil(n / CHUNK))]
    covered = [(launch["slots"][slot][0], chunk) for launch in launches for slot, chunk in launch["blocks"]]
    assert covered == expected

    ordinal = 0
    for i, launch in enumerate(launches):
        blocks, slots = launch["blocks"], launch["slots"]
        assert 1 <= len(blocks) <= max_blocks
        assert 1 <= len(slots) <= max_tensors
        # Ordinals continue across launches: a reduction's partials are one run per tensor.
        assert launch["first_chunk_ordinal"] == ordinal
        ordinal += len(blocks)
        for tensor_index, numel, addresses in slots:
            assert numel == numels[tensor_index] > 0
            assert addresses == [planner.fake_address(d, tensor_index) for d in range(depth)]
        # Slots are filled in list order and each is used by a run of consecutive blocks.
        assert [s for s, _ in blocks] == sorted(s for s, _ in blocks)
        assert {s for s, _ in blocks} == set(range(len(slots)))
        # A launch ends only when it is full: no launch is split needlessly.
        if i + 1 < len(launches):
            last_tensor = slots[blocks[-1][0]][0]
            last_chunk_done = blocks[-1][1] == math.ceil(numels[last_tensor] / CHUNK) - 1
            assert len(blocks) == max_blocks or (len(slots) == max_tensors and last_chunk_done)
            # A tensor cut by the launch boundary continues as slot 0 of the next launch.
            if not last_chunk_done:
                following = launches[i + 1]
                assert following["slots"][0][0] == last_tensor
                assert following["blocks"][0] == (0, blocks[-1][1] + 1)
    return launches


@pytest.mark.parametrize("arg_bytes", BUDGETS)
def test_limits_fill_the_kernel_argument_budget(arg_bytes):
    info = planner.launch_limits(arg_bytes)
    assert info["chunk_size"] == 65536
    functor_room = 128
    for depth in DEPTHS:
        size = info["metadata_bytes"][depth - 1]
        assert size + functor_room <= arg_bytes
        # Less than one slot's bytes (plus padding) is left over: the limit is what the budget holds.
        per_slot = 8 * depth + 8 + 4
        assert arg_bytes - functor_room - size < per_slot + 8
    # Deeper lists carry more addresses per slot, so fewer slots.
    assert len(info["max_tensors"]) == len(info["metadata_bytes"]) == len(DEPTHS)
    assert info["max_tensors"] == sorted(info["max_tensors"], reverse=True)


def test_the_build_reports_its_budget():
    assert swa_fast.BUILD_INFO["kernel_arg_bytes"] in BUDGETS
    assert planner.launch_limits() == planner.launch_limits(swa_fast.BUILD_INFO["kernel_arg_bytes"])


@pytest.mark.parametrize("arg_bytes", BUDGETS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_no_tensors_and_only_empty_tensors_launch_nothing(depth, arg_bytes):
    assert check_plan([], depth, arg_bytes) == []
    assert check_plan([0, 0, 0], depth, arg_bytes) == []


@pytest.mark.parametrize("arg_bytes", BUDGETS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_empty_tensors_among_others_take_no_slot(depth, arg_bytes):
    numels = [0, 5, 0, 0, CHUNK, 0, CHUNK + 1, 0]
    launches = check_plan(numels, depth, arg_bytes)
    assert len(launches) == 1
    assert [slot[0] for slot in launches[0]["slots"]] == [1, 4, 6]
    assert launches[0]["blocks"] == [(0, 0), (1, 0), (2, 0), (2, 1)]


@pytest.mark.parametrize("arg_bytes", BUDGETS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_a_tensor_exactly_filling_a_launch(depth, arg_bytes):
    max_blocks, _ = limits(arg_bytes, depth)
    launches = check_plan([max_blocks * CHUNK, 7], depth, arg_bytes)
    assert len(launches) == 2
    assert len(launches[0]["blocks"]) == max_blocks and len(launches[0]["slots"]) == 1
    # Nothing carried: the next tensor starts the next launch in slot 0, chunk 0.
    assert launches[1]["slots"][0][0] == 1 and launches[1]["blocks"] == [(0, 0)]


@pytest.mark.parametrize("arg_bytes", BUDGETS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_a_tensor_carried_across_launches(depth, arg_bytes):
    max_blocks, _ = limits(arg_bytes, depth)
    numels = [3, (2 * max_blocks + 5) * CHUNK + 11, 9]
    launches = check_plan(numels, depth, arg_bytes)
    assert len(launches) == 3
    # Launch 0: tensor 0 and the first max_blocks - 1 chunks of tensor 1.
    assert [slot[0] for slot in launches[0]["slots"]] == [0, 1]
    # Launches 1 and 2 begin with tensor 1 carried into slot 0.
    assert launches[1]["slots"][0][0] == 1 and launches[1]["blocks"][0] == (0, max_blocks - 1)
    assert launches[2]["slots"][0][0] == 1 and launches[2]["blocks"][0] == (0, 2 * max_blocks - 1)
    assert launches[2]["slots"][-1][0] == 2


@pytest.mark.parametrize("arg_bytes", BUDGETS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_tensor_limit_per_depth(depth, arg_bytes):
    _, max_tensors = limits(arg_bytes, depth)
    launches = check_plan([1] * (3 * max_tensors + 7), depth, arg_bytes)
    assert [len(launch["slots"]) for launch in launches] == [max_tensors] * 3 + [7]


@pytest.mark.parametrize("arg_bytes", BUDGETS)
def test_a_carried_tensor_in_a_full_slot_table(arg_bytes):
    # The slot table fills on a tensor that still has chunks: the launch waits for
    # the block limit, then the tensor is carried.
    depth = 2
    max_blocks, max_tensors = limits(arg_bytes, depth)
    numels = [1] * (max_tensors - 1) + [(max_blocks + 3) * CHUNK]
    launches = check_plan(numels, depth, arg_bytes)
    assert len(launches) == 2
    assert len(launches[0]["slots"]) == max_tensors and len(launches[0]["blocks"]) == max_blocks


@pytest.mark.parametrize("arg_bytes", BUDGETS)
def test_sizes_over_two_to_the_31_elements(arg_bytes):
    big = 3 * 2**31 + 12345  # 98305 chunks: chunk indices and offsets beyond int32 elements
    launches = check_plan([17, big, 2**33 + 1, 5], 1, arg_bytes)
    last_of_big = max(chunk for launch in launches for slot, chunk in launch["blocks"]
                      if launch["slots"][slot][0] == 1)
    assert last_of_big == math.ceil(big / CHUNK) - 1
    assert last_of_big * CHUNK < big <= (last_of_big + 1) * CHUNK
    assert sum(len(launch["blocks"]) for launch in launches) == 1 + 98305 + 131073 + 1


def test_more_chunks_than_int32_are_refused_before_any_launch():
    with pytest.raises(RuntimeError, match="tensor 1 has too many elements"):
        planner.plan_launches([5, 2**31 * CHUNK], 1)


def test_bad_depth_and_budget_are_refused():
    with pytest.raises(RuntimeError, match="depth must be 1 to 9"):
        planner.plan_launches([5], 10)
    with pytest.raises(RuntimeError, match="depth must be 1 to 9"):
        planner.plan_launches([5], 0)
    with pytest.raises(RuntimeError, match="arg_bytes must be 4096 or 32768"):
        planner.plan_launches([5], 1, 8192)


@settings(max_examples=60, deadline=None)
@given(
    numels=st.lists(
        st.one_of(st.just(0), st.integers(1, 3 * CHUNK), st.integers(3 * CHUNK, 700 * CHUNK)), max_size=300
    ),
    depth=st.sampled_from(DEPTHS),
    arg_bytes=st.sampled_from(BUDGETS),
)
def test_random_lists_are_planned_exactly(numels, depth, arg_bytes):
    check_plan(numels, depth, arg_bytes)


def test_the_limits_docs_quote_for_multi_average_depths():
    # docs/ARCHITECTURE.md quotes these for average_ (depth 2) and multi_average_'s buckets
    # (depth 3 for 2 averages, 5 for 3-4, 9 for 5-8).
    small, large = planner.launch_limits(4096), planner.launch_limits(32768)
    assert [small["max_tensors"][d - 1] for d in (2, 3, 5, 9)] == [84, 65, 45, 28]
    assert [large["max_tensors"][d - 1] for d in (2, 3, 5, 9)] == [726, 564, 391, 242]
    assert small["max_blocks"] == 320 and large["max_blocks"] == 2048
