"""One rank of tests/test_integration_lightning.py's distributed tests (gloo on the CPU).

``python lightning_worker.py MODE OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set
(tests/helpers.run_ranks); LOCAL_RANK is set here, so Lightning takes the processes as launched
externally. Modes:

* ``ddp``: Lightning's DDP strategy, 3 epochs, swa_fast's WeightAveraging and then Lightning's (an EMA
  by torch's ``get_ema_multi_avg_fn`` on both) on the same seed and data; the model around each validation.
* ``fsdp``: ModelParallelStrategy with ``fully_shard`` in ``configure_model`` (FSDP2 over both
  ranks), swa_fast's EMAWeightAveraging; the gathered trajectory, a reference EMA of it, the model
  around each validation, and runs resumed after epoch 0 from a distributed checkpoint and from a
  full one (``save_distributed_checkpoint=False``).

Writes ``OUT_DIR/<mode>-rank<RANK>.pt``.
"""

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
os.environ.setdefault("NODE_RANK", "0")

try:  # the package swa_fast.integrations.lightning subclasses
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.swa_utils import get_ema_multi_avg_fn as torch_ema_fn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from swa_fast.averaging.sharding import is_dtensor  # noqa: E402
from swa_fast.integrations import lightning as fast  # noqa: E402
from swa_fast.swa_utils import get_ema_multi_avg_fn as fast_ema_fn  # noqa: E402

warnings.filterwarnings("ignore")
EMA_DECAY = 0.8


class Net(pl.LightningModule):
    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 17), nn.BatchNorm1d(17), nn.ReLU(), nn.Linear(17, 3))
        self.shard = shard
        self.sharded = False

    def configure_model(self):
        if not self.shard or self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[3], mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        self.sharded = True

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def loader(seed: int, n: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator) * 2 + 0.5
    y = (x[:, 0] > 0).long() + (x[:, 1] * x[:, 2] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def local(model: nn.Module) -> dict:
    """The rank's own values: local shards of sharded parameters, everything else as it is."""
    return {k: (v.to_local() if is_dtensor(v) else v).detach().clone() for k, v in model.state_dict().items()}


def full_parameters(model: nn.Module) -> dict:
    """Every parameter in full (a collective for sharded ones: every rank calls it)."""
    return {k: (v.full_tensor() if is_dtensor(v) else v).detach().clone() for k, v in model.named_parameters()}


class Around(pl.Callback):
    """Placed before the callback under test (``first``) or after it: the model at validation start/end."""

    def __init__(self, first: bool) -> None:
        self.first, self.start, self.end = first, [], []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.start.append(local(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.end.append(local(pl_module))


class Trajectory(pl.Callback):
    def __init__(self) -> None:
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append(full_parameters(pl_module))


def trainer(strategy, callbacks, max_epochs, checkpoint_dir=None, val=True) -> pl.Trainer:
    extra = [pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}", save_top_k=-1,
                                          every_n_epochs=1)] if checkpoint_dir else []
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=max_epochs, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=bool(checkpoint_dir), num_sanity_val_steps=1 if val else 0,
                      limit_val_batches=2 if val else 0, callbacks=list(callbacks) + extra)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ddp(out: Path, rank: int) -> dict:
    result = {}
    # An EMA by torch's get_ema_multi_avg_fn (a lerp) on both sides: the same arithmetic, bitwise.
    ours = fast.WeightAveraging(multi_avg_fn=fast_ema_fn(EMA_DECAY))
    theirs = pl.callbacks.WeightAveraging(multi_avg_fn=torch_ema_fn(EMA_DECAY))
    for name, callback in (("ours", ours), ("theirs", theirs)):
        pl.seed_everything(0, verbose=False)
        model = Net()
        before, after = Around(True), Around(False)
        run = trainer("ddp", [before, callback, after], max_epochs=3)
        run.fit(model, loader(1, 128), loader(2, 64))
        result[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if name == "ours":
            result["n_averaged"] = int(callback.average.n_averaged)
            result["restored"] = len(before.start) == 4 and all(same(a, b) for a, b in zip(before.start, after.end))
    result["parameters"] = [name for name, _ in Net().named_parameters()]
    return result


def fsdp(out: Path, rank: int) -> dict:
    ModelParallelStrategy = pl.strategies.ModelParallelStrategy

    def strategy():
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)

    pl.seed_everything(0, verbose=False)
    model = Net(shard=True)
    before, after, path = Around(True), Around(False), Trajectory()
    callback = fast.EMAWeightAveraging(decay=EMA_DECAY)
    run = trainer(strategy(), [path, before, callback, after], max_epochs=2, checkpoint_dir=out / "checkpoints")
    run.fit(model, loader(1, 128), loader(2, 64))
    final = full_parameters(model)
    reference = None
    for step in path.steps:
        reference = dict(step) if reference is None else \
            {k: torch.lerp(reference[k], step[k], 1 - EMA_DECAY) for k in reference}
    restored = len(before.start) == 3 and all(same(a, b) for a, b in zip(before.start, after.end))
    # The last validation came after the last update: what it saw is what the end copied in.
    final_local = local(model)
    swapped_in = all(torch.equal(after.start[-1][k], final_local[k]) for k, _ in model.named_parameters())

    saved = out / "checkpoints" / "epoch=0.ckpt"
    # A distributed checkpoint: the averages sharded as "state_dict", the model's weights in full in
    # the rank-0 metadata file (Lightning's layout otherwise).
    meta = torch.load(saved / "meta.pt", weights_only=False) if saved.is_dir() else {}
    layout = {"sharded": any(is_dtensor(p) for p in model.parameters()), "distributed_checkpoint": saved.is_dir(),
              "current_in_full": sorted(meta.get("current_model_state", {})) == sorted(Net().state_dict())
              and not any(is_dtensor(v) for v in meta["current_model_state"].values()),
              "n_averaged_saved": int(meta.get("averaging_state", {}).get("n_averaged", -1)),
              "n_averaged": int(callback.average.n_averaged)}

    pl.seed_everything(0, verbose=False)
    again = Net(shard=True)
    resumed_callback = fast.EMAWeightAveraging(decay=EMA_DECAY)
    run = trainer(strategy(), [resumed_callback], max_epochs=2)
    run.fit(again, loader(1, 128), loader(2, 64), ckpt_path=saved)
    layout["n_averaged_resumed"] = int(resumed_callback.average.n_averaged)

    # A full checkpoint (save_distributed_checkpoint=False): one file, the averages gathered on rank 0.
    pl.seed_everything(0, verbose=False)
    first = Net(shard=True)
    run = trainer(ModelParallelStrategy(2, 1, save_distributed_checkpoint=False),
                  [fast.EMAWeightAveraging(decay=EMA_DECAY)], max_epochs=1, checkpoint_dir=out / "full")
    run.fit(first, loader(1, 128), loader(2, 64))
    pl.seed_everything(0, verbose=False)
    second = Net(shard=True)
    run = trainer(ModelParallelStrategy(2, 1, save_distributed_checkpoint=False),
                  [fast.EMAWeightAveraging(decay=EMA_DECAY)], max_epochs=2)
    run.fit(second, loader(1, 128), loader(2, 64), ckpt_path=out / "full" / "epoch=0.ckpt")
    full_file = torch.load(out / "full" / "epoch=0.ckpt", weights_only=False)
    layout["full_checkpoint"] = (out / "full" / "epoch=0.ckpt").is_file() and not any(
        is_dtensor(v) for key in ("state_dict", "current_model_state") for v in full_file[key].values())
    return {"final": final, "reference": reference, "restored": restored, "swapped_in": swapped_in,
            "resumed": full_parameters(again), "resumed_full": full_parameters(second), "layout": layout}


def main(mode: str, out: Path) -> None:
    rank = int(os.environ["RANK"])
    result = {"ddp": ddp, "fsdp": fsdp}[mode](out, rank)
    torch.save(result, out / f"{mode}-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
