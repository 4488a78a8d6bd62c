"""Lightning's EMA callback with swa_fast's fused update: swap one import.

In a Lightning script replace::

    from pytorch_lightning.callbacks import EMAWeightAveraging   # or lightning.pytorch.callbacks

with::

    from swa_fast.integrations.lightning import EMAWeightAveraging

and keep everything else: the constructor (``decay``, ``update_every_n_steps``,
``update_starting_at_step``, ...), the validation on the EMA weights, the EMA written into the model
when training ends, and the checkpoints (Lightning's layout: either class resumes from the other's).
``WeightAveraging`` and ``StochasticWeightAveraging`` swap the same way.

This script trains a small MLP with BatchNorm on a synthetic 4-class task generated in memory (no
downloads, a few seconds on a CPU), validating the EMA after every epoch, then trains again with
Lightning's own callback and prints how far the two final models are apart. Lightning's EMA is
``decay * ema + (1 - decay) * w`` per tensor, swa_fast's is torch's fused ``lerp``: the two round
differently in the last bits (``--warmup-gamma`` adds timm's decay warm-up, which Lightning's lacks).

    python examples/with_lightning.py
    python examples/with_lightning.py --warmup-gamma 20
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

try:
    import lightning.pytorch as pl  # noqa: E402
except ImportError:
    import pytorch_lightning as pl  # noqa: E402

from swa_fast.integrations.lightning import EMAWeightAveraging  # noqa: E402  (was: from pytorch_lightning.callbacks import EMAWeightAveraging)

CLASSES, FEATURES = 4, 16


def synthetic_task(count: int, seed: int) -> TensorDataset:
    """``count`` noisy points around 4 fixed class centres (the centres do not depend on ``seed``)."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 1.5
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    return TensorDataset(centres[labels] + torch.randn(count, FEATURES, generator=generator) * 1.8, labels)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, CLASSES))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # runs on the EMA weights (swapped in by the callback)
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class PrintMetrics(pl.Callback):
    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            m = trainer.callback_metrics
            print(f"epoch {trainer.current_epoch}: EMA val loss {m['val_loss']:.3f} acc {m['val_acc']:.3f}")


def train(callback: pl.Callback, epochs: int, verbose: bool) -> Classifier:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[callback] + ([PrintMetrics()] if verbose else []))
    trainer.fit(model, DataLoader(synthetic_task(2048, seed=1), batch_size=64),
                DataLoader(synthetic_task(1024, seed=2), batch_size=256))
    return model  # holds the EMA weights now (the callback copied them in at the end)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--warmup-gamma", type=float, default=None, help="timm's EMA warm-up (swa_fast only)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    extra = {} if args.warmup_gamma is None else {"warmup_gamma": args.warmup_gamma, "warmup_power": 0.75}
    ours = train(EMAWeightAveraging(decay=args.decay, **extra), args.epochs, verbose=True)

    theirs = train(pl.callbacks.EMAWeightAveraging(decay=args.decay), args.epochs, verbose=False)
    a, b = ours.state_dict(), theirs.state_dict()
    gap = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    largest = max(a[k].abs().max().item() for k in a if a[k].is_floating_point())
    print(f"Lightning's EMAWeightAveraging on the same run: largest difference of the final weights {gap:.3g} "
          f"(largest weight {largest:.3g})" + ("; its EMA has no warm-up" if extra else ""))


if __name__ == "__main__":
    main()
