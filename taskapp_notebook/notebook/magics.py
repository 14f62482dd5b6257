"""``%%taskapp`` and ``%taskapp``: start, list and stop task apps from notebook cells.

Library code raises typed errors (``TaskAppError``); these magics are the only place that
turns them into ``UsageError`` — one red line, no traceback, the kernel keeps running.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import textwrap
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import display as _ipython_display
from traitlets import Bool, Enum, Float, Int, Unicode, observe

from .. import registry
from ..errors import TaskAppError, scrub_secrets
from ..loops import running_loop
from ..ports import ALLOWED_HOSTS
from ..tunnels.base import TUNNEL_MODES
from . import options
from .kernel import run_in_namespace
from .options import HelpRequested, Parser, add_start_options, parse, split_args
from .views import AppTable, StatusView, log_text

if TYPE_CHECKING:
    import argparse

    from ..runner import InProcessTaskApp
    from .kernel import KernelHooks
    from .widget import TaskAppView

logger = logging.getLogger(__name__)

SUBCOMMANDS = ("start", "stop", "restart", "list", "status", "url", "logs")

_F = TypeVar("_F", bound=Callable[..., Any])
display: Callable[..., None] = _ipython_display


def _magic(kind: str, name: str) -> Callable[[_F], _F]:
    """``@line_magic(name)`` / ``@cell_magic(name)`` with a type mypy can follow."""
    marker: Any = line_magic if kind == "line" else cell_magic
    decorator: Callable[[_F], _F] = marker(name)
    return decorator


@magics_class
class TaskAppMagics(Magics):
    """Run task apps in this kernel.

    Usage::

        %%taskapp [options]                serve the app the cell body defines:
        app = FastAPI()          # or: config = TaskAppConfig(app_id="x", ...), config_factory

        %taskapp start PATH.py [options]   start the app a .py file defines
        %taskapp list                      every app: state, URL, port, health, uptime
        %taskapp status [NAME]             one app in detail (secrets masked)
        %taskapp url [NAME]                the public URL (returned as a string)
        %taskapp logs [NAME] [-n N]        recent events and requests
        %taskapp restart [NAME]            stop and start again, same port and key
        %taskapp stop [NAME | --all]

    Re-running a cell that started an app replaces that app, on the same port and with the
    same generated key (keyed by the frontend's cell id, else ``--name``, else the magic's
    arguments). If the new app fails to start, the previous one is started again and the
    error says so. Defaults are traits: ``%config TaskAppMagics.tunnel = "local"``.
    """

    tunnel = Enum(TUNNEL_MODES, default_value="synthtunnel",
                  help="Default --tunnel.").tag(config=True)
    serve_on = Enum(options.SERVE_ON, default_value="loop", help=(
        "Default --serve-on. 'loop' (the kernel's loop) falls back to 'thread' when no "
        "loop runs (terminal IPython).")).tag(config=True)
    port = Int(8114, help="Default --port.").tag(config=True)
    host = Enum(ALLOWED_HOSTS, default_value="127.0.0.1", help="Default --host.").tag(config=True)
    health_timeout = Float(30.0, help="Default --health-timeout (seconds).").tag(config=True)
    auto_find_port = Bool(True, help=(
        "Find the next free port when the port is busy (InProcessTaskApp's auto_find_port; "
        "--no-auto-find-port turns it off for one cell).")).tag(config=True)
    auto_port = Bool(None, allow_none=True, help=(
        "Deprecated: the old name of auto_find_port.")).tag(config=True)
    verify_tunnel = Bool(False, help="Default --verify-tunnel.").tag(config=True)
    widget = Bool(True, help="Display the status widget after a start.").tag(config=True)
    api_key_env = Unicode("", help=(
        "Default --api-key-env; empty means ENVIRONMENT_API_KEY or a generated key.")
    ).tag(config=True)

    def __init__(self, shell: Any, hooks: KernelHooks | None = None) -> None:
        super().__init__(shell=shell)
        self.ip: Any = shell
        self.hooks = hooks
        if self not in self.ip.configurables:  # recent IPython appends it already
            self.ip.configurables.append(self)
        #: Launch key (cell id / name / arguments) → the app it started last.
        self.by_key: dict[str, InProcessTaskApp] = {}
        #: Name → the last app started under it (running, stopped or failed).
        self.known: dict[str, InProcessTaskApp] = {}
        #: Launch key → the status view displayed for it (retired when the cell re-runs).
        self.views: dict[str, TaskAppView] = {}
        #: Launch key → the key generated for its first run (every re-run keeps it).
        self.generated_keys: dict[str, str] = {}
        self._counter = itertools.count(1)

    @observe("auto_port")
    def _auto_port_renamed(self, change: Any) -> None:
        if change["new"] is None:
            return
        warnings.warn("TaskAppMagics.auto_port is deprecated; use TaskAppMagics.auto_find_port "
                      "(the name InProcessTaskApp uses).", DeprecationWarning, stacklevel=2)
        self.auto_find_port = bool(change["new"])
        self.auto_port = None

    def close(self) -> None:
        """Forget every app and leave ``shell.configurables`` (used by unload)."""
        self.by_key.clear()
        self.known.clear()
        self.views.clear()
        self.generated_keys.clear()
        while self in self.ip.configurables:
            self.ip.configurables.remove(self)

    # ------------------------------------------------------------------ %%taskapp

    @_magic("cell", "taskapp")
    def taskapp_cell(self, line: str, cell: str) -> InProcessTaskApp | None:
        """Serve the task app this cell defines; return the running instance.

        Usage: ``%%taskapp [--app NAME] [--name NAME] [--tunnel MODE] [--port N] ...``
        (``%%taskapp -h`` lists every option). The body runs in the notebook namespace and
        must define ``app`` (FastAPI/ASGI), ``config`` (TaskAppConfig) or
        ``config_factory`` — or name another variable with ``--app``.
        """
        try:
            opts = parse(options.cell_parser(), split_args(line))
        except HelpRequested as help_:
            print(help_.text)
            return None
        ns = self.ip.user_ns
        before = options.snapshot_sources(ns, opts.app)
        bound: set[str] = set()
        if cell.strip():
            bound = options.bound_names(self.ip.transform_cell(cell))
            self._run_body(cell)
        source = options.resolve_source(ns, before, opts.app, bound)
        return self._launch(source, opts, fallback_key=f"cell:{' '.join(line.split())}")

    def _run_body(self, cell: str) -> None:
        try:
            run_in_namespace(self.ip, cell)
        except TaskAppError as exc:
            raise UsageError(f"%%taskapp: the cell body raised: {_first_line(exc)}") from None
        # any other error is the user's: it propagates with their frames only (kernel.py)

    # ------------------------------------------------------------------ %taskapp

    @_magic("line", "taskapp")
    def taskapp_line(self, line: str = "") -> Any:
        """Manage task apps: start, stop, restart, list, status, url, logs.

        Usage: ``%taskapp SUBCOMMAND [args]`` — see ``%taskapp -h`` / ``TaskAppMagics``.
        A bare ``%taskapp`` is ``%taskapp list``.
        """
        argv = split_args(line)
        if not argv:
            argv = ["list"]
        command, rest = argv[0], argv[1:]
        if command in ("-h", "--help", "help"):
            print(full_help())
            return None
        handler: Callable[[list[str]], Any] | None = getattr(self, f"_cmd_{command}", None)
        if command not in SUBCOMMANDS or handler is None:
            raise UsageError(
                f"Unknown %taskapp subcommand {command!r}. Valid: {', '.join(SUBCOMMANDS)}."
            )
        try:
            return handler(rest)
        except HelpRequested as help_:
            print(help_.text)
            return None

    def _cmd_start(self, argv: list[str]) -> InProcessTaskApp | None:
        parser = Parser(prog="%taskapp start", description="Start the app a .py file defines.")
        parser.add_argument("path", metavar="PATH.py", help="Task app file.")
        add_start_options(parser)
        opts = parse(parser, argv)
        return self._launch({"task_app_path": opts.path}, opts,
                            fallback_key="start:" + " ".join(argv))

    def _cmd_stop(self, argv: list[str]) -> None:
        parser = Parser(prog="%taskapp stop", description="Stop one app, or all of them.")
        parser.add_argument("name", nargs="?", metavar="NAME")
        parser.add_argument("--all", action="store_true", help="Stop every running app.")
        opts = parse(parser, argv)
        if opts.all and opts.name:
            raise UsageError("%taskapp stop: give NAME or --all, not both.")
        if opts.all:
            apps = registry.running()
            registry.stop_all()
            print(f"Stopped {len(apps)} task app(s)." if apps else "No task app was running.")
            return
        app = self._pick(opts.name, "stop")
        app.stop()
        print(f"Stopped task app {app.name!r}.")

    def _cmd_restart(self, argv: list[str]) -> None:
        parser = Parser(prog="%taskapp restart", description="Stop and start an app again.")
        parser.add_argument("name", nargs="?", metavar="NAME")
        opts = parse(parser, argv)
        app = self._pick(opts.name, "restart", include_stopped=True)
        self._start(app, restart=True)
        print(f"Restarted task app {app.name!r} at {app.url}.")

    def _cmd_list(self, argv: list[str]) -> None:
        parse(Parser(prog="%taskapp list", description="List running apps."), argv)
        display(AppTable.from_apps(registry.running()))

    def _cmd_status(self, argv: list[str]) -> None:
        parser = Parser(prog="%taskapp status", description="Show one app in detail.")
        parser.add_argument("name", nargs="?", metavar="NAME")
        opts = parse(parser, argv)
        display(StatusView(self._pick(opts.name, "status", include_stopped=True)))

    def _cmd_url(self, argv: list[str]) -> str:
        parser = Parser(prog="%taskapp url", description="Return an app's public URL.")
        parser.add_argument("name", nargs="?", metavar="NAME")
        app = self._pick(parse(parser, argv).name, "url")
        if not app.url:
            raise UsageError(f"Task app {app.name!r} has no URL (state: {app.state}).")
        return app.url

    def _cmd_logs(self, argv: list[str]) -> None:
        parser = Parser(prog="%taskapp logs", description="Recent events and requests.")
        parser.add_argument("name", nargs="?", metavar="NAME")
        parser.add_argument("-n", type=int, default=20, metavar="N", help="Lines (20).")
        opts = parse(parser, argv)
        if opts.n < 1:
            raise UsageError("%taskapp logs: -n must be at least 1.")
        print(log_text(self._pick(opts.name, "logs", include_stopped=True), opts.n))

    # ------------------------------------------------------------------ launching

    def _launch(
        self, source: dict[str, Any], opts: argparse.Namespace, *, fallback_key: str
    ) -> InProcessTaskApp | None:
        """Replace whatever this cell started before with a new app, running; return it
        (or None when its widget is displayed — ``_`` is bound to it either way)."""
        from ..runner import InProcessTaskApp

        key = self._key(opts, fallback_key)
        previous = self.by_key.get(key)
        name = opts.name or (previous.name if previous is not None else self._new_name(source))
        if opts.port is not None:
            port = opts.port
        else:
            port = previous.port if previous is not None else self.port
        kwargs = self._app_kwargs(opts)
        inherited = self.generated_keys.get(key)
        if kwargs["api_key"] is None and inherited and not os.environ.get("ENVIRONMENT_API_KEY"):
            kwargs["api_key"] = inherited  # every re-run keeps the key its first run generated
        try:
            app = InProcessTaskApp(**source, **kwargs, port=port, name=name)
        except (TaskAppError, OSError) as exc:
            raise UsageError(_first_line(exc)) from None
        if app.api_key_source == "generated":
            self.generated_keys[key] = app.api_key
        replaced = list(dict.fromkeys(
            other for other in [previous, *registry.running()]
            if other is not None and (other is previous or other.name == name)
        ))
        working = [other for other in replaced if other.is_running]
        for other in replaced:
            _stop_quietly(other)
        self.known[name] = app
        try:
            self._start(app, secrets=(kwargs.get("api_key"),
                                      kwargs.get("preconfigured_auth_token")))
        except UsageError as exc:
            raise UsageError(f"{exc} {self._restore(working, app)}") from None
        replaced_view = self.views.pop(key, None)
        if replaced_view is not None:
            replaced_view.retire()
        self.by_key[key] = app
        if opts.var:
            self.ip.user_ns[opts.var] = app
        if self.widget and not opts.no_widget:
            from .widget import TaskAppView  # ipywidgets loads with the first widget

            view = self.views[key] = TaskAppView(app)
            display(view)
            # The widget already shows the app: bind ``_`` without an Out[] repr line.
            self.ip.displayhook.update_user_ns(app)
            return None
        return app

    def _restore(self, working: list[InProcessTaskApp], failed: InProcessTaskApp) -> str:
        """After a failed re-run: start the apps it replaced again (same port and key) and
        say so — or say plainly that they are gone. The failure's details go into their
        log, where ``%taskapp logs NAME`` (now naming the restored app) shows them."""
        if not working:
            return ""
        notes = []
        for old in working:
            for line in list(failed.events)[-6:]:
                old.record_event(f"re-run failed: {line.split(' ', 1)[-1]}")
            try:
                old.restart()
            except (TaskAppError, OSError) as exc:
                notes.append(f"The previous app {old.name!r} could not be started again "
                             f"({_first_line(exc)}); it is stopped.")
            else:
                self.known[old.name] = old
                notes.append(f"The previous app {old.name!r} is running again at {old.url}.")
        return " ".join(notes)

    def _start(self, app: InProcessTaskApp, secrets: tuple[str | None, ...] = (), *,
               restart: bool = False) -> None:
        try:
            app.restart() if restart else app.start()
        except (TaskAppError, OSError) as exc:
            text = scrub_secrets(str(exc), (*app.secrets(), *secrets))
            first = text.splitlines()[0] if text.strip() else type(exc).__name__
            more = f" (details: %taskapp logs {app.name})" if "\n" in text.strip() else ""
            raise UsageError(f"Task app {app.name!r} did not start: {first}{more}") from None
        except BaseException:
            _stop_quietly(app)
            raise

    def _key(self, opts: argparse.Namespace, fallback: str) -> str:
        hooks = self.hooks
        if hooks is not None and hooks.cell_id:
            return f"cell-id:{hooks.cell_id}#{hooks.next_launch_index()}"
        return f"name:{opts.name}" if opts.name else fallback

    def _new_name(self, source: dict[str, Any]) -> str:
        taken = {app.name for app in registry.running()}
        path = source.get("task_app_path")
        if path is not None:
            from pathlib import Path

            stem = Path(str(path)).stem or "taskapp"
            candidates: Iterator[str] = itertools.chain(
                [stem], (f"{stem}-{i}" for i in itertools.count(2))
            )
        else:
            candidates = (f"taskapp-{next(self._counter)}" for _ in itertools.count())
        return next(c for c in candidates if c not in taken)

    def _app_kwargs(self, opts: argparse.Namespace) -> dict[str, Any]:
        tunnel = opts.tunnel or ("preconfigured" if opts.url else self.tunnel)
        if opts.url and tunnel != "preconfigured":
            raise UsageError(f"--url is for --tunnel preconfigured, not --tunnel {tunnel}.")
        serve_on = opts.serve_on or self.serve_on
        if opts.serve_on is None and serve_on == "loop" and running_loop() is None:
            serve_on = "thread"  # terminal IPython: no loop runs during a cell
        key_env = opts.api_key_env or self.api_key_env
        kwargs: dict[str, Any] = {
            "tunnel_mode": tunnel,
            "host": opts.host or self.host,
            "serve_on": serve_on,
            "health_check_timeout": opts.health_timeout or self.health_timeout,
            "auto_find_port": self.auto_find_port and not opts.no_auto_find_port,
            "skip_tunnel_verification": not (opts.verify_tunnel or self.verify_tunnel),
            "force_new_tunnel": opts.force_new_tunnel,
            "api_key": options.env_value(key_env, "--api-key-env") if key_env else None,
            "preconfigured_url": opts.url,
            "preconfigured_auth_header": opts.auth_header,
            "preconfigured_auth_token": options.env_value(opts.auth_token_env, "--auth-token-env")
            if opts.auth_token_env else None,
        }
        return kwargs

    def _pick(self, name: str | None, command: str, *, include_stopped: bool = False
              ) -> InProcessTaskApp:
        apps: list[InProcessTaskApp] = registry.running()
        names = ", ".join(repr(a.name) for a in apps) or "none"
        if name is not None:
            for app in apps:
                if app.name == name:
                    return app
            if include_stopped and name in self.known:
                return self.known[name]
            raise UsageError(f"No running task app named {name!r}. Running: {names}.")
        if len(apps) == 1:
            return apps[0]
        if not apps:
            raise UsageError("No task app is running. Start one with %%taskapp or "
                             "%taskapp start PATH.py.")
        raise UsageError(f"{len(apps)} task apps are running ({names}); "
                         f"name one: %taskapp {command} NAME.")


def _stop_quietly(app: InProcessTaskApp) -> None:
    try:
        app.stop()
    except Exception:  # noqa: BLE001 - replacing an app must not fail on the old one
        logger.warning("Error while stopping %r", app, exc_info=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def full_help() -> str:
    """``%taskapp -h``: every subcommand (the class docstring's ``Usage::`` block), then
    every ``%%taskapp`` option."""
    block = inspect.cleandoc(TaskAppMagics.__doc__ or "").split("Usage::", 1)[-1]
    lines = itertools.takewhile(lambda ln: not ln or ln[0].isspace(), block.splitlines())
    usage = textwrap.dedent("\n".join(lines)).strip("\n")
    return f"{usage}\n\n{options.cell_parser().format_help()}"
