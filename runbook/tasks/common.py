"""Helpers shared by the task modules: flags, settings, outputs, console, progress, error handling.

Exit codes of every task: 0 done; 1 a difference found, or a failover that fell back (or stopped
after its point of no return); 2 bad input or environment (a flag, a setting, an outputs file, a
server or host that cannot be reached, a precondition that does not hold). Errors are one line
on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import sys
from typing import Any, Callable, Iterator, Sequence

from invoke import Exit
from rich.console import Console

from ..contract import Outputs, load
from ..errors import ConfigError, Refused, RunbookError, StepError, VerificationError
from ..redact import RedactingFilter, redact, redact_data
from ..settings import Settings

# without a terminal rich assumes 80 columns: tables would wrap every cell
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 150)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 150)

ENV_PREFIX = "INVOKE_TERN_"

_logging_configured = False


def setup_logging(verbose: bool = False) -> None:
    global _logging_configured
    if _logging_configured:
        return
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, markup=False)
    handler.addFilter(RedactingFilter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], format="%(message)s")
    _logging_configured = True


# -- flags ------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return name if name.startswith("-") else "--" + name.replace("_", "-")


def parse_int(name: str, raw: Any, *, min: int | None = None, max: int | None = None) -> int | None:
    """``raw`` (a flag's string, or ``None`` when not given) as an int within [min, max]; else ConfigError."""
    if raw is None:
        return None
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{_flag(name)} must be an integer, got {raw!r}") from None
    _check_range(name, value, min, max)
    return value


def parse_float(name: str, raw: Any, *, min: float | None = None, max: float | None = None,
                above: float | None = None) -> float | None:
    """``raw`` as a finite float within [min, max] (and > ``above`` when given); else ConfigError."""
    if raw is None:
        return None
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{_flag(name)} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{_flag(name)} must be a finite number, got {raw!r}")
    if above is not None and value <= above:
        raise ConfigError(f"{_flag(name)} must be greater than {above:g}, got {raw}")
    _check_range(name, value, min, max)
    return value


def _check_range(name: str, value: float, min: float | None, max: float | None) -> None:
    if min is not None and max is not None and not min <= value <= max:
        raise ConfigError(f"{_flag(name)} must be between {min:g} and {max:g}, got {value:g}")
    if min is not None and value < min:
        raise ConfigError(f"{_flag(name)} must be at least {min:g}, got {value:g}")
    if max is not None and value > max:
        raise ConfigError(f"{_flag(name)} must be at most {max:g}, got {value:g}")


def parse_choice(name: str, raw: Any, choices: Sequence[str]) -> str | None:
    """``raw`` if it is one of ``choices`` (``None`` passes); else ConfigError listing them."""
    if raw is None:
        return None
    if raw not in choices:
        noun = name.lstrip("-").replace("_", " ").replace("-", " ")
        raise ConfigError(f"unknown {noun} {raw!r}; choose one of: {', '.join(choices)}")
    return raw


def parse_name(name: str, raw: Any, *, required: bool = False) -> str | None:
    """A non-empty single-line name (node, run id, stack); ``None`` passes unless ``required``."""
    if raw is None or raw is True:
        if required or raw is True:
            raise ConfigError(f"{_flag(name)} is required")
        return None
    raw = str(raw)
    if not raw.strip() or any(ch in raw for ch in "\n\r\0"):
        raise ConfigError(f"{_flag(name)} must be a non-empty name, got {raw!r}")
    return raw


# -- settings and outputs --------------------------------------------------------------------
def settings(c, **overrides: Any) -> Settings:
    """The ``tern`` settings from invoke's config (invoke.yaml, INVOKE_TERN_*), then ``overrides``."""
    known = Settings.invoke_defaults()
    unknown = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() not in known)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]} (known: "
                          f"{', '.join(ENV_PREFIX + k.upper() for k in known)})")
    raw = dict(c.config.get("tern", {}) or {})
    try:
        return Settings.from_mapping(raw).replace(**overrides)
    except ConfigError as exc:
        m = re.search(r"tern\.(\w+)", str(exc))
        var = ENV_PREFIX + m.group(1).upper() if m else None
        where = f"from {var}" if var and var in os.environ else "from invoke.yaml or a flag"
        raise ConfigError(f"{exc} ({where})") from None


def outputs(c, stack: str | None) -> Outputs:
    s = settings(c)
    return load(stack or "local", s.sandbox_dir)


def stack_settings(s: Settings, stack: str | None) -> Settings:
    """``s`` with ``state_dir`` narrowed to the runs of ``stack`` (what the journal and report use)."""
    return s.replace(state_dir=s.stack_state_dir(stack))


# -- output -----------------------------------------------------------------------------
def print_json(data: Any) -> None:
    """``data`` as JSON on stdout, redacted value by value before encoding (masking the encoded text
    could swallow a closing quote and leave something that is not JSON)."""
    sys.stdout.write(json.dumps(redact_data(data), indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def human(json_mode: bool) -> Console:
    """Where tables and text go: stdout, or stderr when stdout carries JSON."""
    return console if json_mode else out


def say(message: str) -> None:
    """One plain progress line on stderr (no markup: messages may hold brackets)."""
    console.print(redact(message), markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_status(title: str, *, echo: bool = False) -> Iterator[Callable[[str], None]]:
    """Progress messages: a spinner on a terminal, plain lines on stderr otherwise.

    Yields ``update(message)``. With ``echo``, every message is also printed as a line on a
    terminal (a step log that stays on screen); without a terminal every message is a line.
    """
    if not console.is_terminal:
        say(title)
        last = [title]

        def update(message: str) -> None:
            if message != last[0]:
                last[0] = message
                say(message)

        yield update
        return
    from rich.text import Text

    with console.status(Text(title)) as status:
        def update(message: str) -> None:
            status.update(Text(redact(message)))
            if echo:
                say(f"  {message}")

        yield update


@contextlib.contextmanager
def byte_progress(verb: str) -> Iterator[Callable[[str, int, int], None]]:
    """``progress(name, done, total)`` for transfers: rich bars on a terminal, otherwise a line per
    name when it starts, every 25% and when it is done (rich's bars are invisible without a TTY)."""
    if not console.is_terminal:
        seen: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            quarter = 4 if total and done >= total else (done * 4 // total if total else 0)
            if seen.get(name, -1) >= quarter:
                return
            seen[name] = quarter
            size = f"{done / 1048576:.1f} of {total / 1048576:.1f} MiB" if total else f"{done / 1048576:.1f} MiB"
            say(f"{verb} {name}: {size}" + (" (done)" if quarter == 4 else ""))

        yield progress
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        ids: dict[str, Any] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in ids:
                ids[name] = bar.add_task(f"{verb} {name}", total=total or None)
            bar.update(ids[name], completed=done)

        yield progress


# -- errors -----------------------------------------------------------------------------
def one_line(message: object) -> str:
    """A message on a single line (a contract error lists its fields on several)."""
    lines = [part.strip() for part in str(message).splitlines() if part.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])]).strip() if len(lines) > 1 else (lines[0] if lines else "")


def exit_code(exc: RunbookError) -> int:
    """1 for a difference or a failover that fell back (or stopped); 2 for everything else, a run
    refused by its preflight (nothing changed) included."""
    if isinstance(exc, Refused):
        return 2
    return 1 if isinstance(exc, (StepError, VerificationError)) else 2


def task_errors(fn: Callable) -> Callable:
    """Turn errors into one clear line on stderr and an exit code (see the module docstring); never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except RunbookError as exc:
            raise Exit(f"tern: error: {one_line(redact(exc))}", code=exit_code(exc)) from None
        except OSError as exc:   # the environment: a directory not writable, a disk full, ...
            where = f": {exc.filename}" if exc.filename else ""
            raise Exit(f"tern: error: {one_line(redact(exc.strerror or exc))}{where}", code=2) from None
        except KeyboardInterrupt:
            raise Exit("tern: interrupted; run the same command again to resume", code=130) from None

    return wrapper
