"""Test helpers for adapter folders on disk."""

import shutil

from lava_peft import io


def drop_manifest(path) -> None:
    """Turn a folder written by ``save_pretrained`` into a hand-made one: no manifest and no
    generation copies, only the plain files. That is what an older lava-peft, a user editing files,
    or an attacker hands over; its content is validated on load, not hash-checked."""
    (path / io.MANIFEST_NAME).unlink(missing_ok=True)
    for gen in path.glob(".lava-gen-*"):
        shutil.rmtree(gen)
