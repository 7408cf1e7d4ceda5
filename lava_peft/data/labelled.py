"""Labelled examples from a user's table: column choice, the label mapping, a seeded validation split.

Labels may be strings (``"positive"``) or integers (``0``, ``"3"`` in a CSV).  The mapping
from label to class id is :class:`LabelMap`:

* all labels integers ``0..K-1`` (possibly some missing): id = the integer itself;
* other integers (``-1, 1`` or ``1..5``): the sorted values get ids ``0, 1, ...``;
* strings: the sorted distinct strings get ids ``0, 1, ...``.

The mapping is saved with the run (``run.json`` → ``labels``) and restored with
:meth:`LabelMap.from_json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .user_files import Table, UserDataError

__all__ = ["LabelMap", "LabelledTexts", "labelled_texts", "split_indices"]


@dataclass(frozen=True)
class LabelMap:
    """Class names in id order (``names[i]`` is class ``i``); ``integer`` says the labels were numbers."""

    names: tuple[str, ...]
    integer: bool = False

    @classmethod
    def from_values(cls, values: Sequence[Any], source: str = "the data") -> "LabelMap":
        distinct = set(values)
        if len(distinct) < 2:
            only = next(iter(distinct)) if distinct else None
            raise UserDataError(f"{source}: every example has the label {only!r}; a classifier needs at least two "
                                "classes (check --label-column)")
        if all(isinstance(v, int) for v in distinct):
            ordered = sorted(distinct)
            if ordered[0] >= 0 and ordered[-1] < 2 * len(ordered) + 8:  # ids as given (gaps allowed)
                names = tuple(str(i) for i in range(ordered[-1] + 1))
            else:
                names = tuple(str(v) for v in ordered)
            return cls(names, integer=True)
        return cls(tuple(sorted(str(v) for v in distinct)))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def encode(self, value: Any, where: str) -> int:
        key = str(value)
        try:
            return self._index[key]
        except KeyError:
            raise UserDataError(f"{where}: label {value!r} is not one of the training labels "
                                f"{list(self.names)}; held-out data may only use labels seen in training") from None

    @property
    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def to_json(self) -> dict:
        return {"names": list(self.names), "integer": self.integer}

    @classmethod
    def from_json(cls, data: dict) -> "LabelMap":
        if not isinstance(data, dict) or not isinstance(data.get("names"), list):
            raise UserDataError(f"a saved label mapping must be {{'names': [...], 'integer': bool}}; got {data!r}")
        return cls(tuple(str(n) for n in data["names"]), bool(data.get("integer", False)))


@dataclass
class LabelledTexts:
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any]  # raw values (normalised: ints stay ints, numeric strings become ints)
    places: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def encoded(self, label_map: LabelMap) -> torch.Tensor:
        return torch.tensor([label_map.encode(v, w) for v, w in zip(self.labels, self.places)], dtype=torch.long)


def _need_column(table: Table, column: str, flag: str) -> None:
    if column not in table.columns:
        raise UserDataError(f"{table.source} has no column {column!r} (columns: {', '.join(map(str, table.columns))}); "
                            f"name the right one with {flag}")


def _label_value(value: Any, where: str, column: str) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserDataError(f"{where}: the label ({column!r}) is empty; give every row a label or remove the row")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)
        return stripped
    if isinstance(value, (int, float)):
        return value
    raise UserDataError(f"{where}: the label ({column!r}) is a {type(value).__name__}; labels must be strings or integers")


def _text_value(value: Any, where: str, column: str, flag: str) -> str:
    if value is None or not isinstance(value, (str, int, float)) or (isinstance(value, str) and not value.strip()):
        shown = "empty" if value in (None, "") else f"a {type(value).__name__}, not text"
        raise UserDataError(f"{where}: {column!r} is {shown}; every row needs text in the {flag} column")
    return str(value)


def labelled_texts(table: Table, text_column: str = "text", label_column: str = "label",
                   pair_column: str | None = None) -> LabelledTexts:
    """Texts (and optional second texts) with raw labels; errors name the row and the flag to change."""
    _need_column(table, text_column, "--text-column")
    _need_column(table, label_column, "--label-column")
    if pair_column:
        _need_column(table, pair_column, "--text-pair-column")
    texts, pairs, labels = [], [] if pair_column else None, []
    for i, row in enumerate(table.rows):
        where = table.where(i)
        texts.append(_text_value(row.get(text_column), where, text_column, "--text-column"))
        if pair_column:
            pairs.append(_text_value(row.get(pair_column), where, pair_column, "--text-pair-column"))
        labels.append(_label_value(row.get(label_column), where, label_column))
    return LabelledTexts(texts, pairs, labels, [table.where(i) for i in range(len(table))])


def split_indices(n: int, eval_fraction: float, seed: int, source: str = "the data") -> tuple[list[int], list[int]]:
    """A seeded random split of ``range(n)`` into ``(train, held-out)``; both must be non-empty."""
    if not 0.0 < eval_fraction < 1.0:
        raise UserDataError(f"--eval-split must be a fraction between 0 and 1; got {eval_fraction}")
    n_eval = int(round(n * eval_fraction))
    if n_eval == 0 or n_eval == n:
        raise UserDataError(f"{source} has {n} usable rows: a held-out fraction of {eval_fraction} leaves an empty "
                            f"{'held-out' if n_eval == 0 else 'training'} split; add rows, change --eval-split, or "
                            "give held-out data with --eval-data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_eval:]), sorted(order[:n_eval])
