"""Argument parsing for ``%taskapp`` / ``%%taskapp``, and finding the app a cell defined.

Parsers are IPython ``MagicArgumentParser`` instances, so every argparse error becomes a
``UsageError`` (one red line, no traceback), never ``SystemExit``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import shlex
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser

from ..ports import ALLOWED_HOSTS
from ..tunnels.base import TUNNEL_MODES

SERVE_ON = ("loop", "thread")
#: Variables a ``%%taskapp`` cell may define, in order of preference.
SOURCE_NAMES = ("app", "config", "config_factory")
_MISSING = object()


class HelpRequested(Exception):
    """``-h`` was given: the magic prints ``text`` and does nothing else."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class Parser(MagicArgumentParser):
    """A MagicArgumentParser: errors raise UsageError, ``-h`` raises HelpRequested."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            prog=prog,
            description=description,
            add_help=True,
            formatter_class=argparse.HelpFormatter,
        )

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise UsageError(message or self.format_usage())

    def print_help(self, file: Any = None) -> None:
        raise HelpRequested(self.format_help())


def split_args(line: str) -> list[str]:
    """Split a magic's argument string like a shell would; bad quoting is a UsageError."""
    try:
        return shlex.split(line, posix=True)
    except ValueError as exc:
        raise UsageError(f"Cannot parse arguments {line!r}: {exc}.") from None


def parse(parser: Parser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; argparse errors surface as UsageError with the parser's usage."""
    try:
        return parser.parse_args(argv)
    except UsageError as exc:
        raise UsageError(f"{parser.prog}: {exc}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _identifier(text: str) -> str:
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"not a Python variable name: {text!r}")
    return text


def _port(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None


def add_start_options(parser: Parser) -> None:
    """The options ``%%taskapp`` and ``%taskapp start`` share (they mirror InProcessTaskApp)."""
    add = parser.add_argument
    add("--name", help="Name of the app (unique among running apps).")
    add("--tunnel", choices=TUNNEL_MODES, help="Tunnel mode (default: TaskAppMagics.tunnel).")
    add("--port", type=_port, help="Local port (default: the previous run's, else 8114).")
    add("--host", choices=ALLOWED_HOSTS, help="Host to bind (default 127.0.0.1).")
    add("--api-key-env", metavar="VAR", help="Environment variable holding the app's API key.")
    add("--url", help="Public URL for --tunnel preconfigured (implies it).")
    add("--auth-header", metavar="HEADER", help="Auth header name for the preconfigured URL.")
    add("--auth-token-env", metavar="VAR", help="Environment variable holding that token.")
    add("--serve-on", choices=SERVE_ON, help="Serve on the kernel's loop or its own thread.")
    add("--health-timeout", type=_seconds, metavar="SECONDS", help="Max wait for /health.")
    add("--no-auto-find-port", action="store_true",
        help="Fail (or free it) if the port is busy (auto_find_port=False).")
    add("--no-auto-port", action=_DeprecatedFlag, dest="no_auto_find_port",
        help=argparse.SUPPRESS)
    add("--verify-tunnel", action="store_true", help="Check GET {url}/health through it.")
    add("--force-new-tunnel", action="store_true", help="Fresh managed tunnel (named).")
    add("--no-widget", action="store_true", help="Do not display the status widget.")
    add("--var", type=_identifier, metavar="NAME", help="Bind the instance to this variable.")


class _DeprecatedFlag(argparse.Action):
    """``--no-auto-port``: the old name of ``--no-auto-find-port``; works, and warns."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.pop("nargs", None)
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        warnings.warn(f"{option_string} is deprecated; use --no-auto-find-port (the name of "
                      "InProcessTaskApp's auto_find_port).", DeprecationWarning, stacklevel=2)
        setattr(namespace, self.dest, True)


def cell_parser() -> Parser:
    parser = Parser(prog="%%taskapp", description="Serve the app this cell defines.")
    parser.add_argument(
        "--app", type=_identifier, metavar="NAME",
        help="Variable holding the app, TaskAppConfig or config factory.",
    )
    add_start_options(parser)
    return parser


def env_value(var: str, option: str) -> str:
    """The value of environment variable ``var`` (for ``option``), else UsageError."""
    import os

    value = os.environ.get(var)
    if not value:
        raise UsageError(f"{option} {var}: environment variable {var!r} is not set or empty.")
    return value


def snapshot_sources(ns: Mapping[str, Any], extra: str | None = None) -> dict[str, Any]:
    """What the source variables are bound to before the cell body runs."""
    names = (*SOURCE_NAMES, extra) if extra else SOURCE_NAMES
    return {name: ns.get(name, _MISSING) for name in names}


def bound_names(code: str) -> set[str]:
    """Names a cell body binds at its top level (assignments, ``def``, ``class``, imports,
    ``for`` / ``with`` targets, walrus); empty when the code does not parse."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names: set[str] = set()
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            continue  # their bodies bind local names
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
        pending.extend(ast.iter_child_nodes(node))
    return names


def resolve_source(
    ns: Mapping[str, Any], before: Mapping[str, Any], app_var: str | None,
    bound: set[str] | None = None,
) -> dict[str, Any]:
    """``{"app"|"config"|"config_factory": value}`` for what the cell body defined.

    Defined means bound by the body (``bound``, see :func:`bound_names`) or re-bound while
    it ran; a variable left in the namespace by an earlier cell does not count — the same
    body in a fresh kernel would define nothing either.
    """
    if app_var is not None:
        if app_var not in ns:
            raise UsageError(f"--app {app_var}: no variable named {app_var!r} is defined.")
        return {_classify(ns[app_var], app_var): ns[app_var]}
    bound = bound or set()
    present = [n for n in SOURCE_NAMES if n in ns and (
        n in bound or ns[n] is not before.get(n, _MISSING))]
    if not present:
        raise UsageError(
            "The %%taskapp cell defines none of 'app' (FastAPI/ASGI app), 'config' "
            "(TaskAppConfig) or 'config_factory'. Define one, or pass --app NAME."
        )
    name = present[0]
    kind = _classify(ns[name], name)
    if name != "app" and kind != name:
        raise UsageError(
            f"{name!r} is {_a(type(ns[name]).__name__)}; expected a "
            + ("TaskAppConfig." if name == "config" else "function returning a TaskAppConfig.")
        )
    return {kind: ns[name]}


def _classify(value: Any, label: str) -> str:
    from ..contract import TaskAppConfig

    if isinstance(value, TaskAppConfig):
        return "config"
    if isinstance(value, type):
        raise UsageError(
            f"{label!r} is the class {value.__name__}, not an instance; "
            f"did you mean {label} = {value.__name__}(...)?"
        )
    if callable(value):
        return "config_factory" if _takes_no_arguments(value) else "app"
    raise UsageError(
        f"{label!r} is {_a(type(value).__name__)}, not a FastAPI/ASGI app, a TaskAppConfig or "
        "a config factory."
    )


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: ``'an int'``, ``'a str'``."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _takes_no_arguments(fn: Any) -> bool:
    try:
        inspect.signature(fn).bind()
    except (TypeError, ValueError):
        return False
    return True
