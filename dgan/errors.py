"""The one base class of dgan's user-facing errors, and the exit codes the CLIs document.

Every CLI catches `DganError` once, prints its message (one line that says what is wrong and how
to fix it) and exits with `err.exit_code`: 2 for a bad command line or config (nothing was
started), 1 for anything else. The subclasses live beside the code that raises them (CheckpointError
in checkpoint.py, ...; EvalError and ConfigError are here because several modules raise them:
generation, reference and the tasks; config loading and config checks); each also keeps the builtin base it had
(ValueError or RuntimeError), so older `except ValueError` callers still catch it.
"""
from __future__ import annotations

import sys

EXIT_ERROR = 1
EXIT_USAGE = 2


class DganError(Exception):
    """A problem the user can fix; the message is one line that says how."""
    exit_code = EXIT_ERROR
    label = "error"  # how report() introduces it


class UsageError(DganError, ValueError):
    """A bad command line or config value: exit code 2, nothing was started."""
    exit_code = EXIT_USAGE


class EvalError(DganError, RuntimeError):
    """A user-facing evaluation problem; the message is one line that says what to do.
    Here, not in evaluate.py: generation, the reference set and the tasks raise it too."""


class ConfigError(UsageError):
    """A bad configuration: the message names the key and the fix."""
    label = "config error"


class MetricError(DganError, RuntimeError):
    """A metric cannot be computed; the message is one line that says what to do. Here, not in
    dgan/metrics, so that pixel conversion (dgan/pixels.py) can raise it without torch-fidelity."""


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, cut to `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report(err: DganError, prog: str = "") -> int:
    """Print `[prog: ]<label>: <message>` on stderr, as one line, and return the exit code to use."""
    print(f"{prog + ': ' if prog else ''}{err.label}: {one_line(err, 2000)}", file=sys.stderr, flush=True)
    return err.exit_code
