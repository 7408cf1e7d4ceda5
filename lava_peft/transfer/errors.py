"""The error raised for a Trans-LoRA input that cannot work (checked before any work starts)."""

from ..errors import LavaError

__all__ = ["TransferError"]


class TransferError(LavaError, ValueError):
    """A transfer setting, model pair or data set that cannot work; the message says what to change."""
