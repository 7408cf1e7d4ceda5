"""``python -m lava_peft.data.fetch``: fetch the data sets that need more than ``pip`` (no root).

Today that is Fashion-MNIST (Debian's ``dataset-fashion-mnist``, unpacked into the user cache);
a no-op when it is already there or installed system-wide.  ``make test`` runs it.
"""

from __future__ import annotations

from ._errors import DatasetNotInstalledError
from .fashion_mnist import fetch_fashion_mnist


def main() -> None:
    try:
        where = fetch_fashion_mnist()
    except DatasetNotInstalledError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"Fashion-MNIST: {where}")


if __name__ == "__main__":
    main()
