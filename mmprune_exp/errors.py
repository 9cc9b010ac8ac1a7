"""The errors a user can fix: bad config, a checkpoint that cannot be loaded, bad data files.

``run.py`` and the score CLIs print a :class:`UserError` as one line (no traceback) and exit with
:data:`USER_ERROR_EXIT`; anything else is a programming error and keeps its traceback. Every message
names what is wrong and where: the config key, or the file, record (index or id) and field.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2  # the exit code of argparse and of most CLIs for "you called me wrong"


class UserError(Exception):
    """Bad input; the message alone tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the key (``group.field``) and what is allowed."""


class ModelLoadError(UserError, RuntimeError):
    """The checkpoint could not be loaded; the message says which path/key to fix."""


class DataError(UserError, ValueError):
    """A data file (benchmark, calibration, responses) is missing or malformed; names file, record and key."""


def where(path, index: int | None = None, record_id=None, key: str | None = None) -> str:
    """``file, record 3 (id='x'), key 'bbox'``: the location prefix of a data error message."""
    parts = [str(path)]
    if index is not None or record_id is not None:
        rec = "record" + (f" {index}" if index is not None else "")
        if record_id is not None:
            rec += f" (id={record_id!r})"
        parts.append(rec)
    if key is not None:
        parts.append(f"key {key!r}")
    return ", ".join(parts)
