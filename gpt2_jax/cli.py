"""What the command lines share: one exit-code convention, and errors a user caused on one line.

train.py, generate.py, `python -m gpt2_jax.export` and `python -m gpt2_jax.evaluate` exit with
  0  success, and after --help / --helpshort / --helpfull (the help is what was asked for);
  2  a usage or input error: a bad or missing flag, an unknown config key, a missing or unusable
     file or checkpoint, a config the run cannot start with, a loss that turned NaN, a workdir
     another run holds, a checkpoint that cannot be written (a full disk). The last line on stderr
     is `error: <what is wrong>`; there is no traceback;
  1  anything else: a bug, reported with its traceback.
Ctrl-C outside training's own handler (which checkpoints and exits 0) prints `interrupted` and
exits 130, as shells do. Free of jax, so a bad flag is refused before anything heavy loads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

USAGE_ERROR = 2


def describe(error: BaseException) -> str:
    """An exception as one line: `path: reason` for a file error, else its message with lines joined."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def fail(message: str) -> NoReturn:
    """Ends the program with `error: message` on stderr and the usage-error exit code."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # an unknown flag, a bad value, a required flag left out
        fail(describe(e))
    except SystemExit as e:  # absl's help flags print the help, then exit 1 (0 for --only_check_args)
        sys.exit(0 if e.code in (0, 1) else e.code)


def run(main: Callable[[list[str]], None]) -> None:
    """absl's app.run(main) under this convention: ValueError and OSError (the library's way of
    saying the input is wrong) and app.UsageError become one `error:` line and exit 2."""
    from absl import app, flags

    # --help lists the flags of the program's own file; `python -m gpt2_jax.export` defines them elsewhere.
    for flag in flags.FLAGS.get_key_flags_for_module(sys.modules[main.__module__]):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def guarded(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]} (flags are written --name=value)")
        try:
            main(argv)
        except (ValueError, OSError, app.UsageError) as e:
            fail(describe(e))
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)

    app.run(guarded, flags_parser=_parse_flags)
