"""One error contract for every command line (`python -m hita_jax.main`, `python -m hita_jax.tools.*`):
a user error (`hita_jax.errors.UserError`: a missing or unreadable file, a wrong config file, key or
argument) prints ONE line `error: <message>` on stderr and exits with status 2; with `--verbosity`
given (`--verbosity=N`, `--verbosity N`, absl's `-v`) it keeps its traceback. Every other exception
is a bug and always keeps its traceback.

    if __name__ == '__main__':
      cli.run(main)          # argparse tools: main(argv without --verbosity) -> exit status
      cli.run_absl(main)     # absl tools: --config checked first, then app.run(main)
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, NoReturn, Sequence

from hita_jax.errors import UserError, closest

EXIT_USER_ERROR = 2
VERBOSITY_HELP = ('errors you can fix print one line `error: ...` (exit status 2); '
                  '--verbosity=1 also prints their traceback')
_VERBOSITY = ('verbosity', 'v')  # absl's flag and its short name


def _flag_name(arg: str) -> str | None:
  return arg.lstrip('-').split('=', 1)[0] if arg.startswith('-') else None


def verbose(argv: Sequence[str]) -> bool:
  """Whether the command line asks for tracebacks (`--verbosity[=N]`, `-v[=N]`)."""
  return any(_flag_name(a) in _VERBOSITY for a in argv)


def strip_verbosity(argv: Sequence[str]) -> list[str]:
  """argv without `--verbosity=N` / `--verbosity N` (for argparse tools, which define no such flag)."""
  out, skip = [], False
  for i, a in enumerate(argv):
    if skip:
      skip = False
      continue
    if _flag_name(a) in _VERBOSITY:
      skip = '=' not in a and i + 1 < len(argv) and argv[i + 1].lstrip('-').isdigit()
      continue
    out.append(a)
  return out


def message(e: BaseException | str) -> str:
  """The error's text on one line (KeyError subclasses would otherwise print their repr)."""
  if isinstance(e, KeyError) and len(e.args) == 1:
    e = e.args[0]
  return ' '.join(str(e).split())


def fail(e: BaseException | str) -> NoReturn:
  print(f'error: {message(e)}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors(argv: Sequence[str]):
  """Inside: a UserError becomes `error: ...` and exit status 2, or keeps its traceback with
  `--verbosity` in argv."""
  try:
    yield
  except UserError as e:
    if verbose(argv):
      raise
    fail(e)


@contextlib.contextmanager
def blame(flags: dict[str, object]):
  """Inside: a UserError whose message holds the value of one of `flags` ({'--checkpoint': path})
  gets that flag appended as the fix, ' (fix --checkpoint)', unless it already names it. Type and
  traceback are kept."""
  try:
    yield
  except UserError as e:
    text = message(e)
    given = sorted(((f, str(v)) for f, v in flags.items() if v), key=lambda fv: -len(fv[1]))
    for flag, value in given:  # longest first: '--out x.npz' before '--params x'
      if value in text:
        if flag not in text:
          e.args = (f'{text} (fix {flag})',) + e.args[1:]
        break
    raise


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
  """An argparse tool's `__main__`: main(argv without --verbosity), its return value the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  with user_errors(argv):
    rc = main(strip_verbosity(argv))
  sys.exit(rc)


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith((f'--{flag}=', f'-{flag}=')):
      return a.split('=', 1)[1]
    if a in (f'--{flag}', f'-{flag}') and i + 1 < len(argv):
      return argv[i + 1]
  return None


def config_errors(argv: Sequence[str], flag: str = 'config') -> str | None:
  """Loads the `--config` file of an absl command line (raising the UserError of a missing or
  broken file, or a bad `:arg`) and returns the first `--config.<key>` override naming no key of
  it, as a message with the closest valid keys; absl would print either as a traceback."""
  spec = _flag_value(argv, flag)
  if spec is None:
    return None
  from hita_jax import config_lib
  with blame({f'--{flag}': spec}):  # a bad ':arg' names the file; add the flag
    config = config_lib.load_config(spec)
  prefix = f'--{flag}.'
  overrides = [a[len(prefix):].split('=', 1)[0] for a in argv if a.startswith(prefix)]
  for key in overrides:
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        head = '.'.join(parts[:i])
        near = [f'{head}.{k}' if head else k for k in closest(part, keys)]
        hint = f'; did you mean {" or ".join(near)}?' if near else f'; valid keys here: {sorted(keys)}'
        return f'{prefix}{key}: {spec} has no key {key!r}{hint}'
      node = node[part]
  return None


def run_absl(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
             config_flag: str | None = 'config') -> NoReturn:
  """An absl tool's `__main__`: the `--config` file and overrides checked (config_errors), then
  absl's app.run(main) with user errors shown as one line."""
  argv = list(sys.argv if argv is None else argv)
  with user_errors(argv):
    problem = config_errors(argv, config_flag) if config_flag else None
  if problem:
    fail(problem)

  def guarded(args):
    with user_errors(argv):
      return main(args)
  from absl import app
  app.run(guarded, argv=argv)
  sys.exit(0)  # app.run exits itself; here only for type checkers


def moved(old: str, new: str, rename: dict[str, str] | None = None) -> NoReturn:
  """`python -m <old>` of a command line that moved: one line saying what to run instead."""
  args = [next((n + a[len(o):] for o, n in (rename or {}).items() if a == o or a.startswith(o + '=')), a)
          for a in sys.argv[1:]]
  fail(f'python -m {old} is no longer a command line; run: python -m {new}'
       + (f' {" ".join(args)}' if args else ' ... (--help lists the arguments)'))
