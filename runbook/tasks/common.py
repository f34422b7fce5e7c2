"""Helpers shared by the task modules: settings, outputs, console, error handling."""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable

from invoke import Exit
from rich.console import Console

from ..contract import Outputs, load
from ..errors import RunbookError
from ..redact import RedactingFilter, redact
from ..settings import Settings

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 150)

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


def settings(c, **overrides: Any) -> Settings:
    raw = dict(c.config.get("tern", {}) or {})
    return Settings.from_mapping(raw).replace(**overrides)


def outputs(c, stack: str | None) -> Outputs:
    s = settings(c)
    return load(stack or "local", s.sandbox_dir)


def print_json(data: Any) -> None:
    sys.stdout.write(redact(json.dumps(data, indent=2, sort_keys=True, default=str)) + "\n")
    sys.stdout.flush()


def task_errors(fn: Callable) -> Callable:
    """Turn :class:`RunbookError` into a clear message and a non-zero exit; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except RunbookError as exc:
            raise Exit(f"tern: error: {redact(exc)}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("tern: interrupted; run the same command again to resume", code=130) from None

    return wrapper
