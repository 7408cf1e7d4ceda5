"""Unpack a Debian package into a user folder, without root.

``apt-get download`` fetches a ``.deb`` into the current folder as any user, and
``dpkg-deb -x`` unpacks it anywhere; neither installs anything system-wide.  When apt's
package lists are missing or unreadable (a fresh container where ``apt-get update`` never
ran), a private copy of the lists is fetched into the work folder first
(``apt-get update`` with ``Dir::State::Lists`` / ``Dir::Cache`` pointed there).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

from ._errors import DatasetNotInstalledError

__all__ = ["user_cache_dir", "fetch_debian_package"]

CACHE_ENV = "LAVA_PEFT_CACHE"


def user_cache_dir() -> str:
    """``$LAVA_PEFT_CACHE``, else ``$XDG_CACHE_HOME/lava-peft``, else ``~/.cache/lava-peft``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lava-peft")


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def _download(package: str, work: str) -> str:
    """The downloaded ``.deb`` path; raises DatasetNotInstalledError with apt's own words."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DatasetNotInstalledError(
            f"cannot fetch the Debian package {package!r}: apt-get/dpkg-deb not found (not a Debian-based system)"
        )
    first = _run(["apt-get", "download", package], work)
    if first.returncode != 0:  # no (readable) package lists: fetch private ones
        lists, cache = os.path.join(work, "lists"), os.path.join(work, "cache")
        for d in (os.path.join(lists, "partial"), os.path.join(cache, "archives", "partial")):
            os.makedirs(d, exist_ok=True)
        private = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}", "-o", "Debug::NoLocking=1"]
        update = _run(["apt-get", *private, "update"], work)
        second = _run(["apt-get", *private, "download", package], work)
        if second.returncode != 0:
            raise DatasetNotInstalledError(
                f"`apt-get download {package}` failed ({first.stderr.strip()[-300:]}); with private package "
                f"lists too ({update.stderr.strip()[-200:]} / {second.stderr.strip()[-300:]})"
            )
    debs = glob.glob(os.path.join(work, f"{package}_*.deb"))
    if len(debs) != 1:
        raise DatasetNotInstalledError(f"`apt-get download {package}` left {len(debs)} .deb files in {work}")
    return debs[0]


def fetch_debian_package(package: str, subdir: str, target: str) -> str:
    """Download ``package``, unpack it, and move its folder ``subdir`` (e.g.
    ``usr/share/datasets/fashion-mnist``) to ``target`` in one rename. Returns ``target``."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=parent) as work:
        deb = _download(package, work)
        root = os.path.join(work, "root")
        unpack = _run(["dpkg-deb", "-x", deb, root], work)
        source = os.path.join(root, subdir)
        if unpack.returncode != 0 or not os.path.isdir(source):
            raise DatasetNotInstalledError(
                f"`dpkg-deb -x {os.path.basename(deb)}` did not give {subdir} ({unpack.stderr.strip()[-300:]})"
            )
        if os.path.isdir(target):  # an incomplete earlier copy (the caller found no complete one)
            shutil.rmtree(target)
        os.replace(source, target)
    return target
