"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (see docs/format.md).

Three layers, each a guarantee that ``tests/test_reliability.py`` checks:

* **One file** (:func:`atomic_write_bytes`, :func:`atomic_write_json`,
  :func:`atomic_save_safetensors`): written to a temp name in the same folder, ``fsync``'d,
  renamed over the target, then the folder is ``fsync``'d.  A crash leaves the old file or
  the new one, never a mix or an empty file.
* **A set of files** (:func:`atomic_directory` to write, :func:`read_adapter_files` to read):
  see :func:`atomic_directory` for the manifest scheme; a reader never gets a mixed set.
* **What is read is validated** (:func:`read_json`, :func:`read_safetensors`,
  :func:`tensors_from_bytes`, :func:`check_tensors_match`): header dtypes, floating point
  except declared integer buffers, finite values, keys, shapes and dtype kinds.

Nothing is ever unpickled from an adapter file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .config_payload import fingerprint_digest
from .errors import AdapterFileError

try:  # POSIX advisory locks; elsewhere concurrent writers are not serialized
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "lava_manifest.json"
LOCK_NAME = ".lava-lock"
GENERATION_PREFIX = ".lava-gen-"
STAGING_PREFIX = ".lava-staging-"
KEEP_GENERATIONS = 2
"""Generation folders kept: the current one and the previous complete one."""

# ============================================================================ one file


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new file) durable. No-op where the OS refuses."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (before renaming it into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def _replace_durably(tmp: str, path: Path) -> None:
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        _replace_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, payload: dict) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, tmp, metadata=metadata)
        _replace_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ============================================================================ a set of files


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock`` on ``<directory>/.lava-lock``) for writers.

    Released by the kernel when the process dies, so a killed writer never blocks the next.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Write a set of files into ``target`` as one unit; yields an empty staging folder.

    Usage::

        with atomic_directory(save_dir) as staging:
            atomic_save_safetensors(state, staging / WEIGHTS_NAME, metadata)
            atomic_write_json(staging / CONFIG_NAME, payload)

    The files are switched in only when the block ends without an exception (otherwise
    ``target`` is untouched).  The switch, under :func:`directory_lock` (concurrent writers
    take turns):

    1. every file in the staging folder is fsync'd and hashed (sha256);
    2. ``lava_manifest.json`` (generation ``G`` = previous + 1, each file's sha256 and size)
       is written into it, and the staging folder is renamed to ``target/.lava-gen-G``:
       from here generation ``G`` is complete on disk;
    3. each file is hard-linked (copied where links fail) to its plain name in ``target``
       with an atomic rename, the manifest last; files of the old generation that ``G``
       does not have are removed;
    4. generation folders older than the previous one are removed.

    :func:`read_adapter_files` accepts the top-level files only if they match the top-level
    manifest, and otherwise reads the newest complete generation folder not older than that
    manifest: a kill at any point leaves either the previous or the new set loadable, and
    a reader racing a writer never gets a mix.  Only flat files are switched in; other
    entries of ``target`` (sub-folders of other adapters, a tokenizer) are left alone.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{target} exists and is not a directory; choose another save_directory")
    target.mkdir(parents=True, exist_ok=True)
    with directory_lock(target):
        for stale in target.glob(STAGING_PREFIX + "*"):  # left by a killed writer; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
        try:
            yield staging
            _commit(target, staging)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _generation_folders(target: Path) -> dict[int, Path]:
    found = {}
    for entry in target.glob(GENERATION_PREFIX + "*"):
        number = entry.name[len(GENERATION_PREFIX):]
        if number.isdigit() and entry.is_dir():
            found[int(number)] = entry
    return found


def _commit(target: Path, staging: Path) -> None:
    names = []
    for entry in sorted(staging.iterdir()):
        if entry.name.startswith(".") or entry.name == MANIFEST_NAME:
            # a nested atomic_directory's bookkeeping (manifest, generations, lock): not part of the set
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        elif entry.is_file() and not entry.is_symlink():
            names.append(entry.name)
        else:
            raise AdapterFileError(
                f"atomic_directory({target}) switches in plain files only; {entry.name!r} is a folder or link. "
                "Write each sub-folder with its own atomic_directory"
            )
    files = {}
    for name in names:
        fsync_file(staging / name)
        files[name] = {"sha256": _sha256_file(staging / name), "size": (staging / name).stat().st_size}
    old = _manifest_or_none(target / MANIFEST_NAME)
    generation = 1 + max([old["generation"] if old else 0, *_generation_folders(target)])
    manifest = {"format": "lava-peft-directory", "version": 1, "generation": generation, "files": files}
    atomic_write_json(staging / MANIFEST_NAME, manifest)
    fsync_dir(staging)
    gen_dir = target / f"{GENERATION_PREFIX}{generation:06d}"
    os.rename(staging, gen_dir)
    fsync_dir(target)
    for name in [*names, MANIFEST_NAME]:
        _install(gen_dir / name, target / name)
    fsync_dir(target)
    for name in set(old["files"]) - set(files) if old else ():
        with contextlib.suppress(FileNotFoundError):
            (target / name).unlink()
    for number, folder in sorted(_generation_folders(target).items())[:-KEEP_GENERATIONS]:
        shutil.rmtree(folder, ignore_errors=True)
    fsync_dir(target)


def _install(source: Path, destination: Path) -> None:
    tmp = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (some network / FUSE file systems): copy
        shutil.copyfile(source, tmp)
        fsync_file(tmp)
    os.replace(tmp, destination)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_or_none(path: Path) -> dict | None:
    """A well-formed manifest, or None when absent; a malformed one raises AdapterFileError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return _parse_manifest(raw, path)


def _parse_manifest(raw: bytes, path: Path) -> dict:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    ok = (
        isinstance(data, dict) and data.get("format") == "lava-peft-directory"
        and isinstance(data.get("generation"), int) and not isinstance(data.get("generation"), bool)
        and isinstance(data.get("files"), dict)
        and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
                and isinstance(k, str) and "/" not in k and k not in ("", ".", "..")
                for k, v in data["files"].items())
    )
    if not ok:
        raise AdapterFileError(
            f"{path} is not a valid lava-peft manifest; the folder is corrupt. If its other files are "
            f"what you want, delete {path.name} and the .lava-gen-* folders beside it"
        )
    return data


@dataclass
class AdapterFiles:
    """What :func:`read_adapter_files` read: file name -> bytes, and where from."""

    files: dict[str, bytes]
    source: Path
    """The folder the bytes came from (``directory`` or one of its generation folders)."""
    generation: int | None
    """The manifest's generation; None for a plain folder (no manifest)."""

    @property
    def verified(self) -> bool:
        return self.generation is not None


class _Changed(Exception):
    """The folder changed while it was read (a concurrent writer): read again."""


def read_adapter_files(directory: str | os.PathLike, names: Sequence[str] = (CONFIG_NAME, WEIGHTS_NAME),
                       retries: int = 50) -> AdapterFiles:
    """Read a consistent set of files from a folder written by :func:`atomic_directory` or by hand.

    * With ``lava_manifest.json``: every file it names is read and its sha256 checked; when the
      top-level files do not match (a writer killed or still switching), the newest complete
      generation folder not older than the manifest is read instead.  A folder whose files do
      not match and has no such generation was changed by something else: refused.
    * Without a manifest (older lava-peft, HF PEFT, files copied by hand): ``names`` are read
      as they are (absent ones are left out; the caller decides); unless a complete
      generation folder exists (a kill during the first atomic save), which is then read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {directory} does not exist")
    for attempt in range(retries):
        try:
            return _read_once(directory, names)
        except _Changed:
            time.sleep(min(0.002 * (attempt + 1), 0.05))
    raise AdapterFileError(f"{directory} kept changing while being read ({retries} tries); is a writer stuck in a loop?")


def _read_once(directory: Path, names: Sequence[str]) -> AdapterFiles:
    top = _manifest_or_none(directory / MANIFEST_NAME)
    if top is None:
        newest = _newest_complete_generation(directory, 0)
        if newest is not None:
            return newest
        files = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                files[name] = (directory / name).read_bytes()
        if _manifest_or_none(directory / MANIFEST_NAME) is not None or _generation_folders(directory):
            raise _Changed  # a first atomic save began (its generation folder comes first) or finished meanwhile
        return AdapterFiles(files, directory, None)
    files, problem = {}, None
    for name in top["files"]:
        try:
            files[name] = (directory / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            problem = f"{name} is missing"
            break
    problem = problem or _verify_bytes(files, top)
    if problem is None:
        return AdapterFiles(files, directory, top["generation"])
    fallback = _newest_complete_generation(directory, top["generation"])
    if fallback is not None:
        return fallback
    if _manifest_or_none(directory / MANIFEST_NAME) != top:
        raise _Changed
    raise AdapterFileError(
        f"{directory}: {problem} (generation {top['generation']}); the files were "
        "changed by another program or are corrupt. Save the adapter again; or, if the files as they are "
        f"are what you want, delete {MANIFEST_NAME} and the .lava-gen-* folders in {directory}"
    )


def _newest_complete_generation(directory: Path, at_least: int) -> AdapterFiles | None:
    for number, folder in sorted(_generation_folders(directory).items(), reverse=True):
        if number < at_least:
            break
        try:
            manifest = _manifest_or_none(folder / MANIFEST_NAME)
            if manifest is None or manifest["generation"] != number:
                continue  # not complete (should not happen: the manifest is written before the rename)
            files = {name: (folder / name).read_bytes() for name in manifest["files"]}
        except (FileNotFoundError, NotADirectoryError):
            raise _Changed from None  # removed by a writer pruning old generations
        if _verify_bytes(files, manifest) is None:
            return AdapterFiles(files, folder, number)
    return None


def _verify_bytes(files: dict[str, bytes], manifest: dict) -> str | None:
    for name, entry in manifest["files"].items():
        if hashlib.sha256(files[name]).hexdigest() != entry["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST_NAME}"
    return None


# ============================================================================ validated readers


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter config at {path}; expected the directory written by save_pretrained()")
    return json_from_bytes(path.read_bytes(), path)


def json_from_bytes(raw: bytes, source) -> dict:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{source} is not valid JSON ({exc}); the file is corrupt or truncated") from None


INTEGER_BUFFER_PATTERNS = (
    "sparse_indices",    # SHiRA / SFT indices (int32 / int64)
    "shira_indices",     # HF PEFT SHiRA files
    "codes",             # lowbit: bit-packed uint8 codes
    "shape",             # lowbit: int64 factor shapes
    r"__saved__\..+",    # modules_to_save copies keep their buffers (BatchNorm's counter); check_tensors_match
)                        # then compares each one's dtype kind with the model's
"""Regexes for the integer buffers the format declares: a key may hold an integer/bool tensor when one of
them matches its end (``re.fullmatch`` from the key's start or just after a ``.``); all else must be floating."""

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_INTEGER_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}


def read_safetensors(path: str | os.PathLike, *, integer_keys: Iterable[str] | None = None,
                     allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, validated by :func:`tensors_from_bytes`."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter weights at {path}; expected {WEIGHTS_NAME} next to {CONFIG_NAME}")
    return tensors_from_bytes(path.read_bytes(), path, integer_keys=integer_keys, allow_nonfinite=allow_nonfinite)


def tensors_from_bytes(raw: bytes, source, *, integer_keys: Iterable[str] | None = None,
                       allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes, refusing what would load as silently wrong values.

    * every header dtype is a known floating type, or an integer/bool type for a key matching
      one of ``integer_keys`` (regexes matched against the end of the key; default
      :data:`INTEGER_BUFFER_PATTERNS`, the integer buffers the format declares);
    * floating tensors hold finite values only, unless ``allow_nonfinite=True``.
    """
    patterns = [re.compile(p) for p in (INTEGER_BUFFER_PATTERNS if integer_keys is None else integer_keys)]
    header = _safetensors_header(raw, source)
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype in _FLOAT_DTYPES:
            continue
        if dtype in _INTEGER_DTYPES and any(_matches_end(p, key) for p in patterns):
            continue
        kind = "an integer/bool" if dtype in _INTEGER_DTYPES else "an unknown"
        raise AdapterFileError(
            f"{source}: tensor {key!r} has {kind} dtype {dtype!r} where a floating point tensor is expected "
            "(it would load as silently wrong values); the file is corrupt or was edited. Save the adapter again"
        )
    try:
        tensors = load_safetensors_bytes(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{source} is corrupt or truncated and cannot be read as safetensors ({exc})") from None
    if not allow_nonfinite:
        for key, tensor in tensors.items():
            # max |t| is finite exactly when every value is (amax propagates NaN); one reduction, ~10x faster
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor.abs().amax())):
                bad = int((~torch.isfinite(tensor)).sum())
                raise AdapterFileError(
                    f"{source}: tensor {key!r} holds {bad} of {tensor.numel()} values that are not finite (NaN/Inf); the training "
                    "diverged or the file is corrupt. Use an earlier checkpoint, or pass allow_nonfinite=True "
                    "to read it anyway"
                )
    return tensors


def _matches_end(pattern: re.Pattern, key: str) -> bool:
    return any(pattern.fullmatch(key, start) for start in [0, *(i + 1 for i, c in enumerate(key) if c == ".")])


def _safetensors_header(raw: bytes, source) -> dict:
    if len(raw) < 8:
        raise AdapterFileError(f"{source} is corrupt or truncated and cannot be read as safetensors ({len(raw)} bytes)")
    (length,) = struct.unpack("<Q", raw[:8])
    if length > len(raw) - 8 or length > 100_000_000:
        raise AdapterFileError(
            f"{source} is corrupt or truncated and cannot be read as safetensors (header of {length} bytes in a "
            f"file of {len(raw)})"
        )
    try:
        header = json.loads(raw[8:8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{source} is corrupt or truncated and cannot be read as safetensors (bad header)")
    return header


def fingerprint(shapes: dict[str, list[int]], weights: dict[str, dict | None] | None = None) -> dict:
    """Adapted module names + base weight shapes, and a short hash of both (checked on load); with
    ``weights``, the sha256 of each base weight's bytes too (checked with ``strict_base=True``,
    see :mod:`lava_peft.fingerprint`)."""
    out = {"modules": shapes, "sha256": fingerprint_digest(shapes)}
    if weights is not None:
        out["weights"] = weights
    return out


def check_tensors_match(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source, keys=None) -> None:
    """Refuse a weights file whose keys (``keys``, default all of ``tensors``) or shapes differ from
    ``expected``, or that holds an integer/bool tensor where ``expected`` is floating point."""
    present = set(tensors) if keys is None else set(keys)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    bad_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise AdapterFileError(
            f"{source} does not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]}; the file is corrupt or was edited"
        )
    # integer buffers (SHiRA indices, lowbit codes) are checked by their method on load, with its own message
    bad_kind = [f"{k!r} is {tensors[k].dtype}, not a floating point type like the model's {expected[k].dtype}"
                for k in expected if k in tensors and expected[k].is_floating_point() and not tensors[k].is_floating_point()]
    if bad_kind:
        raise AdapterFileError(
            f"{source}: {'; '.join(bad_kind[:3])}; the file is corrupt or was edited. Save the adapter again"
        )
