"""The errors hpcsoup raises.

Each subclasses the built-in it resembles, so callers can catch either
(``except FileNotFoundError`` catches a :class:`StoreNotFoundError`). Messages
name the object, the bad value and the fix.
"""


class HpcsoupError(Exception):
    """Base class of every error hpcsoup raises on purpose."""


class ConfigError(HpcsoupError, ValueError):
    """A configuration key is unknown or has a bad value."""


class DatasetError(HpcsoupError, ValueError):
    """A dataset name is unknown or its files cannot be loaded."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset's files are not on disk and cannot be downloaded."""


class ModelError(HpcsoupError, ValueError):
    """A model configuration or a set of weights is invalid."""


class StoreError(HpcsoupError, ValueError):
    """The Zarr store holds something corrupt, missing or inconsistent."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """A store path, group or array does not exist."""


class SoupError(HpcsoupError, ValueError):
    """Experts cannot be souped (e.g. different architectures)."""


class MergeError(HpcsoupError, ValueError):
    """Experts cannot be merged with H-GRAMA."""


class StoreAccessError(StoreError, OSError):
    """The file system refused a store operation (read-only, not a folder, full, over quota)."""


class ExpertsMissingError(StoreError):
    """Fewer complete experts than the config asks for (training unfinished or failed)."""
