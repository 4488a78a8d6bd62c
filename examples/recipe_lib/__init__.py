"""Shared pieces of the training recipes in ``examples/``.

Data (``datasets``, ``transforms``, ``loader``), networks (``models``), one
epoch of training and evaluation (``training``), the epoch loop with
averaging, checkpoints and resume (``engine``), the post-hoc EMA recipe's
per-step EMA, snapshots, sweep and report (``posthoc``), torchrun support
(``distributed``), atomic checkpoint files (``checkpoint``), the output folder
of a run (``outputs``), metrics, tables, plots and the list of outputs
(``reporting``), the plain-language verdict that ends a run (``verdict``) and
the shared command line, presets and option checks (``cli``).

The recipes (``examples/*.py``) put ``examples/`` on ``sys.path`` by being run
from there, so they ``import recipe_lib``. The data side keeps whole data sets
decoded in memory as uint8 tensors (Fashion-MNIST, CIFAR and the Intel image
set are all well under a few GB that way) and augments batches with tensor ops
on the training device: no worker processes, no torchvision.
"""

from recipe_lib.datasets import (
    DatasetError,
    DataSplits,
    ImageDataset,
    MissingDataError,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
)
from recipe_lib.loader import BatchLoader, shard_indices
from recipe_lib.transforms import (
    DEFAULT_STATS,
    channel_stats,
    compose,
    pad_to,
    random_crop,
    random_hflip,
    resize,
    to_float,
)

__all__ = [
    "BatchLoader",
    "DEFAULT_STATS",
    "DataSplits",
    "DatasetError",
    "ImageDataset",
    "MissingDataError",
    "channel_stats",
    "compose",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "pad_to",
    "random_crop",
    "random_hflip",
    "resize",
    "shard_indices",
    "to_float",
]
