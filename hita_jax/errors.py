"""Errors a user can cause (a bad config value, a missing or unsafe file, data that do not fit the
model). `main` prints them as one line and exits non-zero, without a traceback unless
`--verbosity` is given; every other exception is a bug and keeps its traceback."""
from __future__ import annotations

import difflib


class UserError(ValueError):
  """A problem the user can fix; the message names the thing and the fix."""


class MissingPathError(UserError, FileNotFoundError):
  """A weights file, export or data directory that does not exist."""


class ExistingPathError(UserError, FileExistsError):
  """An output path that already holds something and is not to be overwritten."""


class MissingEntryError(UserError, KeyError):
  """A file that exists but lacks the entry asked for (an .npz array, a checkpoint key)."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a non-finite loss or gradient norm too many steps in a row."""


class SaveError(UserError, OSError):
  """A checkpoint or export could not be written (disk full, read-only directory)."""


def closest(name: str, valid, n: int = 3) -> list[str]:
  """The valid names nearest to a misspelt `name` (difflib ratio), best first."""
  return difflib.get_close_matches(name, [str(v) for v in valid], n=n, cutoff=0.6)


def require_path(path: str | None, what: str, flag: str) -> None:
  """Raises MissingPathError naming `what` and the flag to fix when `path` is set but absent."""
  import os
  if path and path not in ('random', 'synthetic') and not os.path.exists(path):
    raise MissingPathError(f'{what} not found: {path} (fix --config.{flag}=<existing path>)')


def read_json_object(path: str, context: str = '') -> dict:
  """A JSON file that must hold an object: a missing, non-JSON or non-object file is a UserError
  naming `path` (and `context`, e.g. ': DIR is not a hita_jax params export')."""
  import json
  import os
  if not os.path.exists(path):
    raise MissingPathError(f'{path} not found{context}')
  try:
    with open(path) as f:
      value = json.load(f)
  except ValueError as e:  # not JSON, or not UTF-8
    raise UserError(f'{path} is not valid JSON ({e}){context}') from e
  if not isinstance(value, dict):
    raise UserError(f'{path} holds no JSON object (found {type(value).__name__}){context}')
  return value
