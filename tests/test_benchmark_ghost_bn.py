"""The ghost BN benchmark suite's cases have the issue's shapes, and the runner runs it end to end.

No timing is asserted (a timing is a benchmark, never a test assertion).
"""

from pathlib import Path

import torch

from benchmarks import ghost_bn
from benchmarks import run as bench_run

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_cases_are_the_issues_shapes():
    cpu = {name: case for name, case in ghost_bn.CASES.items() if case.applies_to("cpu")}
    assert {(c.shape, c.ghost_batch_size) for c in cpu.values()} == {
        ((256, 64, 32, 32), 32), ((2048, 64, 32, 32), 128), ((4096, 512), 128)}
    gpu_only = [c for c in ghost_bn.CASES.values() if c.gpu_only]
    assert {c.dtype for c in gpu_only} == {torch.float32, torch.bfloat16} and any(c.channels_last for c in gpu_only)


def test_every_candidate_computes_the_same_gradients():
    case = ghost_bn.GhostCase("tiny", (8, 3, 4, 4), 4)
    candidates = {c.key: c for c in ghost_bn.build_candidates(case, "cpu")}
    assert set(candidates) == {"batchnorm", "chunk_loop", "reshape_trick", "swa_fast", "copy"}
    for candidate in candidates.values():
        candidate.fn()  # each runs
    # The three ghost implementations the suite times agree on the output and on every gradient.
    torch.manual_seed(0)
    x0 = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    upstream = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    ghost = ghost_bn._GHOST[4](3, 4).double()
    chunk = ghost_bn._PLAIN[4](3).double()
    trick = ghost_bn._reshape_trick(case, chunk.weight, chunk.bias, 1e-5)
    with torch.no_grad():
        for module in (ghost, chunk):
            module.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
            module.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward_backward(fn, params):
        x = x0.clone().requires_grad_()
        for p in params:
            p.grad = None
        out = fn(x)
        out.backward(upstream)
        return [out.detach(), x.grad, *(p.grad.clone() for p in params)]

    results = [
        forward_backward(ghost, (ghost.weight, ghost.bias)),
        forward_backward(lambda x: torch.cat([chunk(c) for c in x.split(4)]), (chunk.weight, chunk.bias)),
        forward_backward(trick, (chunk.weight, chunk.bias)),
    ]
    for other in results[1:]:
        for got, want, name in zip(other, results[0], ("output", "grad input", "grad weight", "grad bias")):
            torch.testing.assert_close(got, want, msg=name)


def test_runner_quick_ghost_bn_end_to_end(monkeypatch, capsys):
    tiny = ghost_bn.GhostCase("gbn_tiny", (16, 4, 8, 8), 4, note="tiny")
    tiny_1d = ghost_bn.GhostCase("gbn_tiny_1d", (64, 8), 16, note="tiny 1d")
    monkeypatch.setattr(ghost_bn, "CASES", {"gbn_tiny": tiny, "gbn_tiny_1d": tiny_1d})
    report = bench_run.main(["--device", "cpu", "--quick", "--suites", "ghost_bn", "--no-save", "--repeats", "2"])
    assert set(report["cases"]) == {"gbn_tiny", "gbn_tiny_1d"}
    result = report["cases"]["gbn_tiny"]
    assert result["suite"] == "ghost_bn" and result["num_ghosts"] == 4
    assert set(result["candidates"]) == {"batchnorm", "chunk_loop", "reshape_trick", "swa_fast", "copy"}
    assert result["candidates"]["swa_fast"]["bytes_per_update"] == 8 * tiny.activation_bytes
    assert "swa_fast vs chunk loop" in result["speedups"]
    assert "== gbn_tiny" in capsys.readouterr().out
