"""Read a user's table of examples: CSV/TSV, JSON Lines, JSON, Parquet, or a saved ``datasets`` directory.

Every reader returns a :class:`Table`: a list of row dicts plus, for each row, where it
came from (``"line 12"`` of a text file, ``"row 12"`` of a Parquet or Arrow table), so a
bad value can be reported at its place.

Which library reads what (no library is required for the text formats):

* ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json``: the Python standard library (``csv``, ``json``),
  so that a malformed row is reported with its line number;
* ``.parquet``: ``pyarrow`` (``pip install pyarrow``);
* a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``:
  ``datasets.load_from_disk`` when ``datasets`` is installed, else the Arrow files are read
  directly with ``pyarrow`` (the light reader).  A ``DatasetDict`` contributes its ``train``
  split, and its ``validation`` (or ``test``) split as held-out data.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LavaError

__all__ = ["UserDataError", "Table", "read_table", "read_split_tables", "TABLE_SUFFIXES"]

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
INSTALL_PYARROW = "pip install 'pyarrow>=12'"


class UserDataError(LavaError, ValueError):
    """A user's data file cannot be used as given; the message names the file, the place and the fix."""


@dataclass
class Table:
    """Rows of one file (or one split of a saved data set)."""

    rows: list[dict[str, Any]]
    places: list[str]  # where each row came from: "line 7", "row 3"
    source: str  # the file (and split) for messages
    columns: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        return f"{self.source}, {self.places[i]}"

    def subset(self, indices) -> "Table":
        idx = list(indices)
        return Table([self.rows[i] for i in idx], [self.places[i] for i in idx], self.source, list(self.columns))


def read_table(path: str | Path, backend: str = "auto") -> Table:
    """The rows of ``path`` (the ``train`` split of a saved ``DatasetDict``).

    ``backend="builtin"`` forces the light reader for a saved ``datasets`` directory
    (pyarrow only), ``"datasets"`` requires the ``datasets`` library.
    """
    return read_split_tables(path, backend)[0]


def read_split_tables(path: str | Path, backend: str = "auto") -> tuple[Table, Table | None]:
    """``(train rows, held-out rows or None)``: held-out rows exist only for a saved ``DatasetDict``
    with a ``validation`` or ``test`` split."""
    if backend not in ("auto", "builtin", "datasets"):
        raise UserDataError(f"backend must be 'auto', 'builtin' or 'datasets'; got {backend!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserDataError(f"data file {str(p)!r} does not exist; give a .csv, .tsv, .jsonl, .json or .parquet "
                            "file, a folder saved with datasets' save_to_disk, or an image folder")
    if p.is_dir():
        return _read_saved_dataset(p, backend)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        table = _read_csv(p, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        table = _read_jsonl(p)
    elif suffix == ".json":
        table = _read_json(p)
    elif suffix == ".parquet":
        table = _read_parquet(p)
    else:
        raise UserDataError(f"{p}: unknown file type {suffix or '(no suffix)'!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    if not table.rows:
        raise UserDataError(f"{p} holds no rows; add examples to it")
    return table, None


# ----------------------------------------------------------------------------- text files
def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserDataError(f"{p}, line {line}: not valid UTF-8 ({exc.reason}); save the file as UTF-8") from None


def _read_csv(p: Path, delimiter: str) -> Table:
    text = _read_text(p)
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    rows, places = [], []
    try:
        header = next(reader, None)
        if header is None:
            raise UserDataError(f"{p} is empty; the first line must name the columns")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or "" in header:
            raise UserDataError(f"{p}, line 1: the header {header} has empty or repeated column names; name every "
                                "column once")
        start = reader.line_num + 1
        for values in reader:
            if not values or all(not v.strip() for v in values):  # blank line
                start = reader.line_num + 1
                continue
            if len(values) != len(header):
                raise UserDataError(f"{p}, line {start}: {len(values)} fields but the header has {len(header)} "
                                    f"({', '.join(header)}); quote fields that contain {delimiter!r}")
            rows.append(dict(zip(header, values)))
            places.append(f"line {start}")
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UserDataError(f"{p}, line {reader.line_num}: unreadable CSV ({exc}); check the quoting") from None
    return Table(rows, places, str(p), header)


def _read_jsonl(p: Path) -> Table:
    rows, places, columns = [], [], {}
    for number, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserDataError(f"{p}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                "each line must hold one JSON object") from None
        if not isinstance(row, dict):
            raise UserDataError(f"{p}, line {number}: a JSON {type(row).__name__}, not an object; each line must "
                                'hold one object such as {"text": ..., "label": ...}')
        rows.append(row)
        places.append(f"line {number}")
        columns.update(dict.fromkeys(row))
    return Table(rows, places, str(p), list(columns))


def _read_json(p: Path) -> Table:
    try:
        data = json.loads(_read_text(p))
    except json.JSONDecodeError as exc:
        raise UserDataError(f"{p}, line {exc.lineno}: not valid JSON ({exc.msg}); a .json file must hold a list "
                            "of objects (or use .jsonl, one object per line)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserDataError(f"{p} holds a JSON {type(data).__name__}; it must be a list of objects "
                            '([{"text": ..., "label": ...}, ...]) or {"data": [...]}')
    columns: dict = {}
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserDataError(f"{p}, item {i}: a JSON {type(row).__name__}, not an object")
        columns.update(dict.fromkeys(row))
    return Table(list(data), [f"item {i}" for i in range(len(data))], str(p), list(columns))


# ----------------------------------------------------------------------------- Arrow based
def _pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserDataError(f"reading {what} needs pyarrow, which is not installed. Install it with:  "
                            f"{INSTALL_PYARROW}  (or convert the data to .csv / .jsonl)") from None
    return pyarrow


def _arrow_table(arrow, source: str) -> Table:
    rows = arrow.to_pylist()
    return Table(rows, [f"row {i}" for i in range(len(rows))], source, list(arrow.column_names))


def _read_parquet(p: Path) -> Table:
    _pyarrow(f"{p} (Parquet)")
    import pyarrow.parquet as pq

    try:
        arrow = pq.read_table(str(p))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise UserDataError(f"{p} cannot be read as Parquet ({exc}); the file is corrupt or not Parquet") from None
    return _arrow_table(arrow, str(p))


HELDOUT_SPLITS = ("validation", "valid", "dev", "test")


def _read_saved_dataset(p: Path, backend: str) -> tuple[Table, Table | None]:
    if (p / "dataset_dict.json").is_file():
        splits = json.loads(_read_text(p / "dataset_dict.json")).get("splits", [])
        if "train" not in splits:
            raise UserDataError(f"{p} is a saved DatasetDict with splits {splits} but no 'train' split; give the "
                                "folder of one split instead (e.g. {p}/{splits[0] if splits else 'train'})")
        held = next((s for s in HELDOUT_SPLITS if s in splits), None)
        train = _read_one_split(p / "train", backend, f"{p} [train]")
        return train, (_read_one_split(p / held, backend, f"{p} [{held}]") if held else None)
    if (p / "state.json").is_file():
        return _read_one_split(p, backend, str(p)), None
    raise UserDataError(f"{p} is a folder but neither a saved Hugging Face data set (no state.json or "
                        "dataset_dict.json) nor an image folder (sub-folders of images, one per class)")


def _read_one_split(p: Path, backend: str, source: str) -> Table:
    use_datasets = backend == "datasets"
    if backend == "auto":
        try:
            import datasets  # noqa: F401

            use_datasets = True
        except ImportError:
            use_datasets = False
    if use_datasets:
        try:
            from datasets import load_from_disk
        except ImportError:
            raise UserDataError("backend='datasets' needs the datasets library: pip install datasets") from None
        try:
            ds = load_from_disk(str(p))
        except Exception as exc:  # noqa: BLE001
            raise UserDataError(f"{source} cannot be loaded with datasets.load_from_disk ({exc})") from None
        if not hasattr(ds, "to_list"):
            raise UserDataError(f"{source} holds a {type(ds).__name__}; give the folder of one split or of a DatasetDict")
        rows = ds.to_list()
        table = Table(rows, [f"row {i}" for i in range(len(rows))], source, list(ds.column_names))
    else:
        _pyarrow(f"the saved data set {p}")
        import pyarrow as pa

        state = json.loads(_read_text(p / "state.json"))
        files = [f["filename"] for f in state.get("_data_files", [])]
        if not files:
            raise UserDataError(f"{p}/state.json lists no data files; re-save the data set with save_to_disk")
        parts = []
        for name in files:
            try:
                with pa.memory_map(str(p / name)) as source_file:
                    parts.append(pa.ipc.open_stream(source_file).read_all())
            except Exception as exc:  # noqa: BLE001
                raise UserDataError(f"{p / name} cannot be read as Arrow ({exc}); the saved data set is corrupt") from None
        table = _arrow_table(pa.concat_tables(parts), source)
    if not table.rows:
        raise UserDataError(f"{source} holds no rows; add examples to it")
    return table
