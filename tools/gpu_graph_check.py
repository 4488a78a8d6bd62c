"""A whole training step with swa_fast in it, captured in one CUDA graph and replayed.

The step: forward through a small conv net whose BatchNorms are ghost batch
norms (running statistics updated on the device), cross-entropy, backward,
SGD with momentum, an SWA and an EMA ``AveragedModel.update_parameters``, and
the weight distance to the initial weights. Two identical setups run: one
replays the captured graph, the other runs the same steps eagerly; every
weight, average, running statistic and distance must agree. Then a loop of
eager steps runs under ``torch.cuda.set_sync_debug_mode("error")``: any host
synchronisation in it raises.

    python3 tools/gpu_graph_check.py                 # on a GPU
    python3 tools/gpu_graph_check.py --device cpu    # the same steps eagerly on the CPU (a dry run)

Exit status 1 when anything disagrees or synchronises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from swa_fast import swa_utils  # noqa: E402
from swa_fast.ops.distance import distance_norms  # noqa: E402
from swa_fast.nn import convert_ghost_batchnorm  # noqa: E402

BATCH, GHOST, WARMUP, REPLAYS, NO_SYNC_STEPS = 32, 8, 3, 5, 5


class Setup:
    """Model, optimizer, two averages, the initial weights and static input/output buffers."""

    def __init__(self, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )
        self.model = convert_ghost_batchnorm(model, GHOST).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.swa = swa_utils.AveragedModel(self.model)
        self.ema = swa_utils.AveragedModel(self.model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
        self.initial = [p.detach().clone() for p in self.model.parameters()]
        generator = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(BATCH, 3, 8, 8, generator=generator).to(device)
        self.y = torch.randint(0, 10, (BATCH,), generator=generator).to(device)
        self.distance = torch.zeros((), device=device)

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.swa.update_parameters(self.model)
        self.ema.update_parameters(self.model)
        _, total = distance_norms(list(self.model.parameters()), self.initial)
        self.distance.copy_(total)

    def state(self) -> Dict[str, torch.Tensor]:
        found = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        found.update({f"swa.{k}": v for k, v in self.swa.state_dict().items()})
        found.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        found["distance"] = self.distance
        return {k: v.detach().clone() for k, v in found.items()}


def compare(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> List[str]:
    problems = []
    for key, value in want.items():
        other = got[key]
        if value.is_floating_point():
            if not torch.allclose(other, value, rtol=1e-5, atol=1e-6):
                problems.append(f"{key}: max |diff| {(other - value).abs().max().item():.3g}")
        elif not torch.equal(other, value):
            problems.append(f"{key}: {other.tolist()} != {value.tolist()}")
    return problems


def max_diff(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> float:
    return max((got[k].double() - v.double()).abs().max().item() for k, v in want.items() if v.is_floating_point())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:  # the same convolution algorithms in the graph and in eager mode
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    replayed, eager = Setup(device), Setup(device)
    for _ in range(WARMUP):
        eager.step()
    if cuda:
        # Warm up on a side stream (builds the averaging plans, the momentum
        # buffers), as torch.cuda.graphs asks, then capture one step.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                replayed.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed.step()  # recorded, not run
        for _ in range(REPLAYS):
            graph.replay()
    else:
        for _ in range(WARMUP + REPLAYS):
            replayed.step()
    for _ in range(REPLAYS):
        eager.step()
    if cuda:
        torch.cuda.synchronize()
    got, want = replayed.state(), eager.state()
    problems = compare(got, want)
    what = "graph replay" if cuda else "eager CPU steps (no graph on the CPU)"
    print(f"graph_check: {what} vs eager after {WARMUP} + {REPLAYS} steps: {len(want)} tensors, "
          f"max |diff| {max_diff(got, want):.3g}, swa n_averaged {int(replayed.swa.n_averaged)}, "
          f"distance {float(replayed.distance):.6g}")
    for problem in problems:
        print(f"MISMATCH {problem}")

    synced = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(NO_SYNC_STEPS):
                eager.step()
        except RuntimeError as error:  # the sync debug mode raises at the synchronising call
            synced = str(error).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"graph_check: {NO_SYNC_STEPS} eager steps under set_sync_debug_mode('error'): "
              f"{'a host sync: ' + synced if synced else 'no host sync'}")
    ok = not problems and synced is None
    print(f"graph_check: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
