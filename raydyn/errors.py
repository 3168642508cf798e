"""User-facing errors. The CLI prints these without a traceback."""
from __future__ import annotations


class RaydynError(Exception):
    """A mistake in user input (sweep file, store path, CLI argument).

    The message must name the offending thing: a key path, a file, a run id,
    and what is allowed instead.
    """


class SpecError(RaydynError):
    """A sweep file that does not validate."""


class StoreError(RaydynError):
    """A store that cannot be read or written."""


class DataError(RaydynError):
    """A data set on disk (or a user's loader) that cannot be read or does not validate.

    The message names the file, folder or import path, and what is wrong with it.
    """


class RaydynWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. a GPU reserved but unused).
    The CLI prints it as one ``warning:`` line."""
