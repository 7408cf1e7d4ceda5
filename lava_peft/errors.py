"""Exception types raised by lava-peft.

Every error a user can cause derives from :class:`LavaError`; the ones caused by a
bad value (a config field, a file, a model that does not fit) also derive from
``ValueError`` so that generic ``except ValueError`` handlers keep working.
Messages always say what to change.
"""


class LavaError(Exception):
    """Base class of every lava-peft error."""


class LavaConfigError(LavaError, ValueError):
    """A config field has a value that cannot work (rank <= 0, unknown key, ...)."""


class TargetModulesError(LavaConfigError):
    """``target_modules`` matched nothing, or matched a layer type we cannot adapt."""


class UnsupportedLayerError(LavaError, TypeError):
    """A module selected for adaptation is of a type the method does not support."""


class AdapterNameError(LavaError, ValueError):
    """An adapter name is unknown, already taken, or not a valid name."""


class IncompatibleBaseModelError(LavaError, ValueError):
    """An adapter file was saved for a base model with other modules or shapes."""


class AdapterFileError(LavaError, ValueError):
    """An adapter file is missing, truncated, corrupt, or from an unknown method/newer format."""
