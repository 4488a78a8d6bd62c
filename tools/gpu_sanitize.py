"""Runs every swa_fast kernel once through its edge cases, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 tools/gpu_sanitize.py      # and racecheck, initcheck
    python3 tools/gpu_sanitize.py --device cpu                          # the same calls on the CPU kernels

Sizes are small (the sanitizer slows kernels by 10-100x) except the two that
must be large: a tensor cut across launches and more tensors than one launch
holds, both derived from the build's launch limits (swa_fast.ops.launch_plan.launch_limits).
Every result is also compared with the CPU kernels' (on CUDA) or with a
pure-torch reference (on the CPU), so a wrong answer fails here too, not only
a bad memory access. Exit status 1 if any case raised or differed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import swa_fast  # noqa: E402
from swa_fast.ops.launch_plan import launch_limits  # noqa: E402

OPS = torch.ops.swa_fast
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MIXED = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float64, torch.float32),
         (torch.float64, torch.bfloat16)]
ODD_SIZES = [0, 1, 3, 5, 7, 17, 1023, 4099]  # empty, under and around every vector width
EPS = 1e-5


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's bytes in element order: equal exactly when bitwise equal (NaNs, signed zeros)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


class Driver:
    def __init__(self, device: str):
        self.device = torch.device(device)
        self.calls: Counter = Counter()
        self.failures: List[str] = []
        limits = launch_limits()
        self.chunk = limits["chunk_size"]
        self.max_blocks = limits["max_blocks"]
        self.max_tensors = limits["max_tensors"]

    # -- helpers -----------------------------------------------------------

    def tensor(self, shape, dtype, seed, offset: int = 0, fmt=torch.contiguous_format) -> torch.Tensor:
        """Random values of `dtype`, stored `offset` elements into a fresh storage (misaligned when > 0)."""
        generator = torch.Generator().manual_seed(seed)
        values = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        values = values.contiguous(memory_format=fmt)
        if offset == 0:
            return values.to(self.device)
        storage = torch.empty(values.numel() + offset, dtype=dtype, device=self.device)
        strides_order = sorted(range(values.dim()), key=lambda d: -values.stride(d))
        permuted = values.permute(*strides_order)
        view = storage[offset:].view(permuted.shape).permute(*[strides_order.index(d) for d in range(values.dim())])
        view.copy_(values)
        return view

    def run(self, op: str, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # a fault surfaces here, attributed to this case
            self.calls[op] += 1
        except Exception:  # noqa: BLE001 - every case runs; the failure is reported and counted
            self.failures.append(f"{op} / {name}:\n{traceback.format_exc()}")

    def check(self, got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 0.0, atol: float = 0.0) -> None:
        got, want = got.detach().cpu(), want.detach().cpu()
        if got.shape != want.shape or got.dtype != want.dtype:
            raise AssertionError(f"{what}: {got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}")
        if rtol == 0.0 and atol == 0.0:
            if not torch.equal(got, want):
                raise AssertionError(f"{what}: differs from the reference")
        elif not torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True):
            diff = (got.double() - want.double()).abs().max().item()
            raise AssertionError(f"{what}: max |diff| {diff:.3g} over rtol {rtol} atol {atol}")

    def on_cpu(self, tensors):
        return [t.detach().cpu().clone() for t in tensors]

    # -- average_, average_moments_, multi_average_, nonfinite_flag ----------

    def averaging(self) -> None:
        # Same dtypes and mixed pairs, odd sizes with empty tensors among them, misaligned views.
        pairs = [(d, d) for d in FLOATS] + MIXED
        for avg_dtype, cur_dtype in pairs:
            for offset in (0, 1):
                name = f"{avg_dtype}<-{cur_dtype} offset {offset}"
                averaged = [self.tensor(n, avg_dtype, i, offset) for i, n in enumerate(ODD_SIZES)]
                current = [self.tensor(n, cur_dtype, 50 + i, offset) for i, n in enumerate(ODD_SIZES)]
                self.run("average_", name, lambda a=averaged, c=current: self.average_case(a, c, 0.3))
                sq = [a * a for a in averaged]
                self.run("average_moments_", name, lambda a=averaged, s=sq, c=current: self.moments_case(a, s, c))
                variance = [a * a for a in averaged]
                deviation = [torch.zeros_like(a) for a in averaged]
                self.run("swag_moments_", name, lambda a=averaged, v=variance, d=deviation, c=current:
                         self.swag_case(a, v, d, c))
                self.run("swag_moments_", name + " no deviation", lambda a=averaged, v=variance, c=current:
                         self.swag_case(a, v, [], c))
        # Stochastic rounding: fp16/bf16 averages of fp16/bf16/fp32 values (the CPU's bits exactly), with
        # fp32 averages and integer copies in the same call, misaligned views.
        for avg_dtype in (torch.float16, torch.bfloat16):
            for cur_dtype in (avg_dtype, torch.float32):
                for offset in (0, 1):
                    name = f"{avg_dtype}<-{cur_dtype} offset {offset}"
                    averaged = [self.tensor(n, avg_dtype, i, offset) for i, n in enumerate(ODD_SIZES)]
                    current = [self.tensor(n, cur_dtype, 70 + i, offset) for i, n in enumerate(ODD_SIZES)]
                    counts = torch.zeros(3, dtype=torch.long, device=self.device)
                    averaged += [self.tensor(17, torch.float32, 5), counts]
                    current += [self.tensor(17, torch.float32, 6), counts + 1]
                    self.run("average_stochastic_", name,
                             lambda a=averaged, c=current: self.stochastic_case(a, c, 0.3))
        # weight 1 (copy), skip true and false, integer and bool copies.
        ints = [self.tensor(9, torch.float32, 1).mul(40).round().to(dt) for dt in
                (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool)]
        targets = [torch.zeros_like(t) for t in ints]
        self.run("average_", "integer copies", lambda: self.average_case(targets, ints, 0.5))
        for skip in (True, False):
            averaged = [self.tensor(33, torch.float32, 7)]
            current = [self.tensor(33, torch.float32, 8)]
            self.run("average_", f"skip {skip}", lambda a=averaged, c=current, s=skip: self.average_case(a, c, 1.0, s))
        # More tensors than one launch holds (depth 2 and 3), one tensor cut across launches.
        many = self.max_tensors[1] + 5
        averaged = [self.tensor(3 + i % 7, torch.float32, i) for i in range(many)]
        current = [self.tensor(3 + i % 7, torch.bfloat16, 900 + i) for i in range(many)]
        self.run("average_", f"{many} tensors", lambda: self.average_case(averaged, current, 0.25))
        many = self.max_tensors[2] + 5
        mean = [self.tensor(5, torch.float32, i) for i in range(many)]
        self.run("average_moments_", f"{many} tensors",
                 lambda: self.moments_case(mean, [m * m for m in mean], [self.tensor(5, torch.float32, 7000 + i)
                                                                          for i in range(many)]))
        many = self.max_tensors[3] + 5
        mean = [self.tensor(5, torch.float32, i) for i in range(many)]
        self.run("swag_moments_", f"{many} tensors",
                 lambda: self.swag_case(mean, [m * m for m in mean], [torch.zeros_like(m) for m in mean],
                                        [self.tensor(5, torch.float32, 8000 + i) for i in range(many)]))
        big = (self.max_blocks + 1) * self.chunk + 3
        averaged = [self.tensor(5, torch.float32, 1), self.tensor(big, torch.float32, 2), self.tensor(7, torch.float32, 3)]
        current = [self.tensor(5, torch.float32, 4), self.tensor(big, torch.float32, 5), self.tensor(7, torch.float32, 6)]
        self.run("average_", f"a tensor of {big} elements across launches",
                 lambda: self.average_case(averaged, current, 0.7))
        self.run("nonfinite_flag", "a tensor across launches", lambda: self.nonfinite_case(current, poison=big - 1))
        self.multi_averaging(pairs)
        # nonfinite_flag: every floating dtype, views, float8 and complex.
        for dtype in FLOATS:
            tensors = [self.tensor(n, dtype, i, offset=1) for i, n in enumerate(ODD_SIZES)]
            self.run("nonfinite_flag", f"{dtype}", lambda t=tensors: self.nonfinite_case(t, poison=None))
            self.run("nonfinite_flag", f"{dtype} NaN", lambda t=tensors: self.nonfinite_case(t, poison=2))
        many = self.max_tensors[0] + 5
        tensors = [self.tensor(4, torch.float16, i) for i in range(many)]
        self.run("nonfinite_flag", f"{many} tensors", lambda: self.nonfinite_case(tensors, poison=None))
        odd = [self.tensor(6, torch.float32, 1).to(torch.float8_e4m3fn), torch.zeros(3, dtype=torch.complex64,
                                                                                         device=self.device)]
        self.run("nonfinite_flag", "float8 and complex", lambda: self.check(
            swa_fast.nonfinite_flag(odd), torch.tensor(False), "float8/complex flag"))

    def multi_averaging(self, pairs) -> None:
        # multi_average_: K = 1 (average_'s launch), 3 (depth 5), 8 (depth 9, one pass), 9 (8 + 1:
        # two passes); every dtype pair; current and every other list of averages misaligned.
        weights = [0.3, 1.0, 0.0, 0.7, 0.5, 0.125, 0.999, 0.45, 0.6]
        for avg_dtype, cur_dtype in pairs:
            for count in (1, 3, 8, 9):
                name = f"K={count} {avg_dtype}<-{cur_dtype}"
                current = [self.tensor(n, cur_dtype, 50 + i, count % 2) for i, n in enumerate(ODD_SIZES)]
                averaged = [[self.tensor(n, avg_dtype, 100 * k + i, k % 2) for i, n in enumerate(ODD_SIZES)]
                            for k in range(count)]
                self.run("multi_average_", name,
                         lambda a=averaged, c=current, w=weights[:count]: self.multi_case(a, c, w))
        # Device weights (float32, strided), integer and bool copies into every list, skip.
        averaged = [[self.tensor(n, torch.float32, 10 * k + i) for i, n in enumerate(ODD_SIZES)] for k in range(5)]
        current = [self.tensor(n, torch.float16, 70 + i) for i, n in enumerate(ODD_SIZES)]
        strided = torch.tensor([w for w in weights[:5] for _ in (0, 1)], dtype=torch.float32, device=self.device)[::2]
        self.run("multi_average_", "device weights", lambda: self.multi_case(averaged, current, strided))
        ints = [self.tensor(9, torch.float32, 1).mul(40).round().to(dt) for dt in
                (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool)]
        for count in (3, 9):
            targets = [[torch.zeros_like(t) for t in ints] for _ in range(count)]
            self.run("multi_average_", f"integer copies K={count}",
                     lambda t=targets, w=weights[:count]: self.multi_case(t, ints, w))
        for skip in (True, False):
            averaged = [[self.tensor(33, torch.float32, 7 + k)] for k in range(9)]
            current = [self.tensor(33, torch.float32, 8)]
            self.run("multi_average_", f"skip {skip}",
                     lambda a=averaged, c=current, s=skip: self.multi_case(a, c, weights, s))
        # More tensors than a depth-9 launch holds (a tensor cut across launches is the harness's
        # own path, run above with average_; a second huge one would only slow the sanitizers).
        many = self.max_tensors[8] + 5
        averaged = [[self.tensor(3 + i % 7, torch.float32, 100 * k + i) for i in range(many)] for k in range(8)]
        current = [self.tensor(3 + i % 7, torch.bfloat16, 900 + i) for i in range(many)]
        self.run("multi_average_", f"K=8, {many} tensors", lambda: self.multi_case(averaged, current, weights[:8]))

    def expected_average(self, averaged, current, weight, skip=None):
        """What average_ must leave in averaged, on the CPU: the CPU kernel's result (on CUDA) or a
        float64 reference (on the CPU)."""
        want = self.on_cpu(averaged)
        cur_cpu = self.on_cpu(current)
        if skip:
            return want
        if self.device.type == "cuda":
            swa_fast.average_(want, cur_cpu, weight)
            return want
        return [c.to(w.dtype) if weight == 1.0 or not w.is_floating_point()
                else w.double().lerp(c.double(), weight).to(w.dtype) for w, c in zip(want, cur_cpu)]

    def check_averaged(self, averaged, want, what: str) -> None:
        # Within one rounding of the reference (bitwise parity with torch is the GPU tests' business).
        for i, (got, ref) in enumerate(zip(averaged, want)):
            tol = 0.0 if not got.is_floating_point() else (1e-2 if got.element_size() == 2 else 1e-6)
            self.check(got, ref, f"{what}[{i}]", rtol=tol, atol=tol)

    def average_case(self, averaged, current, weight, skip=None) -> None:
        want = self.expected_average(averaged, current, weight, skip)
        skip_tensor = None if skip is None else torch.tensor(skip, device=self.device)
        swa_fast.average_(averaged, current, weight, skip=skip_tensor)
        self.check_averaged(averaged, want, "averaged")

    def multi_case(self, averaged, current, weights, skip=None) -> None:
        values = [float(w) for w in (weights.cpu() if isinstance(weights, torch.Tensor) else weights)]
        skip_tensor = None if skip is None else torch.tensor(skip, device=self.device)
        # The contract: average k is bitwise what average_ with weights[k] gives on this device...
        separate = [[t.clone() for t in ts] for ts in averaged]
        for ts, w in zip(separate, values):
            swa_fast.average_(ts, current, w, skip=skip_tensor)
        want = [self.expected_average(ts, current, w, skip) for ts, w in zip(averaged, values)]
        swa_fast.multi_average_(averaged, current, weights, skip=skip_tensor)
        for k, (ts, sep, ref) in enumerate(zip(averaged, separate, want)):
            for i, (got, one) in enumerate(zip(ts, sep)):
                self.check(raw_bytes(got), raw_bytes(one), f"average {k}[{i}] against average_")
            # ...and within one rounding of the CPU kernels (float64 on the CPU).
            self.check_averaged(ts, ref, f"average {k}")

    def moments_case(self, mean, sq, current) -> None:
        want_mean, want_sq, cur_cpu = self.on_cpu(mean), self.on_cpu(sq), self.on_cpu(current)
        swa_fast.average_moments_(want_mean, want_sq, cur_cpu, 0.4)
        swa_fast.average_moments_(mean, sq, current, 0.4)
        for i, (got, ref) in enumerate(zip(mean + sq, want_mean + want_sq)):  # on the CPU: the op against itself
            tol = 1e-2 if got.element_size() == 2 else 1e-6
            self.check(got, ref, f"moments[{i}]", rtol=tol, atol=tol)

    def stochastic_case(self, averaged, current, weight) -> None:
        on_cpu = self.on_cpu(averaged)
        counter = 2**33 + 3
        swa_fast.average_stochastic_(on_cpu, self.on_cpu(current), weight, torch.tensor(counter), 11)
        swa_fast.average_stochastic_(averaged, current, weight, torch.tensor(counter, device=self.device), 11)
        for i, (got, ref) in enumerate(zip(averaged, on_cpu)):
            self.check(got, ref, f"stochastic[{i}]")  # the same words and rounding on both: bitwise

    def swag_case(self, mean, variance, deviation, current) -> None:
        lists = [self.on_cpu(mean), self.on_cpu(variance), self.on_cpu(deviation)]
        swa_fast.swag_moments_(*lists, self.on_cpu(current), 0.4)
        swa_fast.swag_moments_(mean, variance, deviation, current, 0.4)
        for i, (got, ref) in enumerate(zip(mean + variance + deviation, lists[0] + lists[1] + lists[2])):
            tol = 1e-2 if got.element_size() == 2 else 1e-6  # on the CPU: the op against itself
            self.check(got, ref, f"swag[{i}]", rtol=tol, atol=tol)

    def nonfinite_case(self, tensors, poison) -> None:
        if poison is not None:
            target = next(t for t in tensors if t.numel() > poison)
            target.view(-1)[poison] = float("nan")
        flag = swa_fast.nonfinite_flag(tensors)
        self.check(flag, torch.tensor(poison is not None), "nonfinite flag")
        if poison is not None:
            target.view(-1)[poison] = 0.0

    # -- distance ----------------------------------------------------------

    def distance(self) -> None:
        pairs = [(d, d) for d in FLOATS] + MIXED + [(torch.bfloat16, None), (torch.float64, None)]
        for a_dtype, b_dtype in pairs:
            for offset in (0, 1):
                a = [self.tensor(n, a_dtype, i, offset) for i, n in enumerate(ODD_SIZES)]
                b = None if b_dtype is None else [self.tensor(n, b_dtype, 70 + i, offset) for i, n in enumerate(ODD_SIZES)]
                self.run("distance", f"{a_dtype} vs {b_dtype} offset {offset}", lambda a=a, b=b: self.distance_case(a, b))
        runs_per_launch = 600 if self.max_blocks == 320 else 4200  # more tensors than one runs launch holds
        a = [self.tensor(2 + i % 5, torch.float32, i) for i in range(runs_per_launch)]
        b = [self.tensor(2 + i % 5, torch.float32, 9000 + i) for i in range(runs_per_launch)]
        self.run("distance", f"{runs_per_launch} tensors", lambda: self.distance_case(a, b))
        big = (self.max_blocks + 1) * self.chunk + 3
        a = [self.tensor(big, torch.float32, 1), self.tensor(3, torch.float32, 2)]
        b = [self.tensor(big, torch.bfloat16, 3), self.tensor(3, torch.bfloat16, 4)]
        self.run("distance", f"a tensor of {big} elements across launches", lambda: self.distance_case(a, b))
        cl = [self.tensor((4, 8, 3, 3), torch.float32, 5, fmt=torch.channels_last)]
        self.run("distance", "channels_last vs contiguous",
                 lambda: self.distance_case(cl, [self.tensor((4, 8, 3, 3), torch.float32, 6)]))

    def distance_case(self, a, b) -> None:
        per_tensor, total = OPS.distance(a, b)
        diffs = [x.double().cpu() - (0 if b is None else y.double().cpu()) for x, y in zip(a, b or a)]
        want = torch.stack([d.norm() for d in diffs])
        self.check(per_tensor.double(), want, "per-tensor norms", rtol=1e-5, atol=1e-6)
        self.check(total.double(), want.norm(), "total norm", rtol=1e-5, atol=1e-6)

    # -- ghost batch norm ----------------------------------------------------

    def ghost(self) -> None:
        cases = [
            ((10, 3, 7, 7), torch.contiguous_format, 4),  # remainder ghosts 4 + 4 + 2, S = 49 (scalar)
            ((12, 16, 3, 3), torch.channels_last, 5),  # vectorized channels_last, ghosts 5 + 5 + 2
            ((10, 3, 7, 7), torch.channels_last, 4),  # C = 3: scalar channels_last
            ((16, 5), torch.contiguous_format, 4),  # 2-D
            ((9, 3, 8), torch.contiguous_format, 3),  # 3-D, S = 8
            ((8, 4, 3, 4, 5), torch.channels_last_3d, 4),  # 5-D
            ((64, 2, 32, 32), torch.contiguous_format, 32),  # few pairs: split sums and the merge kernel
            ((64, 2, 32, 32), torch.channels_last, 32),
            ((6, 264, 2, 3), torch.channels_last, 3),  # several channel tiles
        ]
        for shape, fmt, ghost in cases:
            for dtype in FLOATS:
                for offset in (0, 1):
                    name = f"{list(shape)} {fmt} ghost {ghost} {dtype} offset {offset}"
                    self.run("ghost_batch_norm", name,
                             lambda s=shape, f=fmt, g=ghost, d=dtype, o=offset: self.ghost_case(s, f, g, d, o))
        for average in (False, True):
            for momentum in (None, 0.1):
                self.run("ghost_batch_norm_update_stats_", f"average {average} momentum {momentum}",
                         lambda a=average, m=momentum: self.update_stats_case(a, m, channels=7))
        self.run("ghost_batch_norm_update_stats_", "C = 0", lambda: self.update_stats_case(False, None, channels=0))

    def ghost_case(self, shape, fmt, ghost, dtype, offset) -> None:
        x = self.tensor(shape, dtype, 1, offset, fmt)
        dy = self.tensor(shape, dtype, 2, offset, fmt)
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        weight = self.tensor(shape[1], param_dtype, 3).abs_().add_(0.5)
        bias = self.tensor(shape[1], param_dtype, 4)
        out, mean, var = OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)
        grads = OPS.ghost_batch_norm_backward(dy, x, weight, mean, var, ghost, EPS, True)
        no_dx = OPS.ghost_batch_norm_backward(dy, x, None, mean, var, ghost, EPS, False)
        plain = OPS.ghost_batch_norm(x, None, None, ghost, EPS)
        # The CPU kernels on the same values are the reference (on the CPU: float64 through the same op).
        ref_dtype = dtype if self.device.type == "cuda" else torch.float64
        ref_param = param_dtype if self.device.type == "cuda" else torch.float64
        xc, dyc = x.cpu().to(ref_dtype), dy.cpu().to(ref_dtype)
        wc, bc = weight.cpu().to(ref_param), bias.cpu().to(ref_param)
        r_out, r_mean, r_var = OPS.ghost_batch_norm(xc, wc, bc, ghost, EPS)
        r_grads = OPS.ghost_batch_norm_backward(dyc, xc, wc, r_mean, r_var, ghost, EPS, True)
        low = dtype in (torch.float16, torch.bfloat16)
        tol = 5e-2 if low else (1e-4 if dtype == torch.float32 else 1e-9)
        self.check(out.to(ref_dtype), r_out, "output", rtol=tol, atol=tol)
        self.check(mean.to(r_mean.dtype), r_mean, "mean", rtol=1e-4, atol=1e-5)
        self.check(var.to(r_var.dtype), r_var, "var", rtol=1e-4, atol=1e-5)
        for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, r_grads):
            scale = max(1.0, want.double().abs().max().item())
            self.check(got.to(want.dtype), want, name, rtol=tol, atol=tol * scale)
        self.check(no_dx[0], torch.empty(0, dtype=dtype), "no grad_input")
        self.check(plain[1], mean, "statistics without affine")

    def update_stats_case(self, average, momentum, channels) -> None:
        ghosts, batch, ghost = 3, 11, 4  # ghosts of 4, 4 and 3 samples
        mean = self.tensor((ghosts, channels), torch.float32, 1)
        var = self.tensor((ghosts, channels), torch.float32, 2).abs_()
        running = [self.tensor(channels, torch.float32, 3), self.tensor(channels, torch.float32, 4).abs_()]
        tracked = torch.tensor(2, device=self.device)
        want = [r.cpu().clone() for r in running]
        want_tracked = torch.tensor(2)
        OPS.ghost_batch_norm_update_stats_(*want, want_tracked, mean.cpu(), var.cpu(), batch, ghost, 5, momentum,
                                           average)
        OPS.ghost_batch_norm_update_stats_(*running, tracked, mean, var, batch, ghost, 5, momentum, average)
        self.check(tracked, want_tracked, "num_batches_tracked")
        for got, ref in zip(running, want):
            self.check(got, ref, "running statistics", rtol=1e-6, atol=1e-7)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    driver = Driver(args.device)
    for family in (driver.averaging, driver.distance, driver.ghost):
        family()
    calls = ", ".join(f"{op} {n}" for op, n in sorted(driver.calls.items()))
    print(f"gpu_sanitize: {sum(driver.calls.values())} cases passed on {args.device} "
          f"({calls}) in {time.perf_counter() - begin:.1f} s; build {swa_fast.BUILD_INFO['kernel_arg_bytes']}-byte "
          f"kernel arguments, {driver.max_blocks} blocks and {driver.max_tensors} tensors per launch")
    for failure in driver.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print(f"gpu_sanitize: {len(driver.failures)} failed")
    return 1 if driver.failures else 0


if __name__ == "__main__":
    sys.exit(main())
