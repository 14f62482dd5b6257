"""Where rollouts go: an :class:`~taskapp_notebook.InProcessTaskApp` of this process, or any
task-app URL with its credentials (a local URL + API key, or a SynthTunnel public URL +
worker token)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .exceptions import GepaParameterError
from .run_options import check_http_url

if TYPE_CHECKING:
    import asyncio

    from ..runner import InProcessTaskApp

WORKER_TOKEN_HEADER = "X-SynthTunnel-Worker-Token"


@dataclass
class AppTarget:
    """The task app a run calls, and how to authenticate to it."""

    url: str
    label: str
    headers: dict[str, str] = field(repr=False)
    app: InProcessTaskApp | None = None
    secrets: list[str | None] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return f"AppTarget({self.label!r}, url={self.url!r})"

    def serving_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop serving the app when it runs in this process (matched by URL for a URL
        target), else None."""
        if self.app is not None:
            return self.app.loop
        from .. import registry

        for app in registry.running():
            if self.url in (app.local_url, (app.url or "").rstrip("/")):
                loop: asyncio.AbstractEventLoop | None = app.loop
                return loop
        return None

    def unavailable(self) -> str | None:
        """Why the in-process app cannot serve now, or None."""
        if self.app is not None and not self.app.is_running:
            return f"the task app {self.app.name!r} is {self.app.state}"
        return None


def resolve_target(task_app: Any, *, api_key: str | None, worker_token: str | None,
                   through_tunnel: bool) -> AppTarget:
    """An :class:`AppTarget` for ``task_app`` (an InProcessTaskApp or a URL)."""
    from ..runner import InProcessTaskApp

    if isinstance(task_app, InProcessTaskApp):
        if not task_app.is_running:
            raise GepaParameterError(
                f"The task app {task_app.name!r} is {task_app.state}; start it first "
                "(run its %%taskapp cell, or await task_app.astart()).")
        if api_key is not None or worker_token is not None:
            raise GepaParameterError(
                "api_key= and worker_token= are for URL targets; an InProcessTaskApp brings "
                "its own credentials.")
        if through_tunnel:
            if not task_app.url:
                raise GepaParameterError(f"The task app {task_app.name!r} has no public URL.")
            headers = {"X-API-Key": task_app.api_key}
            token = task_app.task_app_worker_token
            if token:
                headers.update({WORKER_TOKEN_HEADER: token, "Authorization": f"Bearer {token}"})
            return AppTarget(task_app.url.rstrip("/"), f"{task_app.name} ({task_app.tunnel_mode})",
                             headers, task_app, [task_app.api_key, token])
        key = task_app.api_key
        return AppTarget(task_app.local_url, task_app.name,
                         {"X-API-Key": key, "Authorization": f"Bearer {key}"}, task_app, [key])
    if isinstance(task_app, str):
        url = check_http_url(task_app, "task_app").rstrip("/")
        if through_tunnel:
            raise GepaParameterError("through_tunnel= applies to an InProcessTaskApp; a URL "
                                        "target is called at the URL given.")
        if api_key is None and worker_token is None:
            raise GepaParameterError(
                f"Calling the task app at {url!r} needs credentials: api_key= (its "
                "ENVIRONMENT_API_KEY) for a local URL, or worker_token= for a SynthTunnel URL.")
        sent: dict[str, str] = {}
        if api_key is not None:
            _check_secret(api_key, "api_key")
            sent.update({"X-API-Key": api_key, "Authorization": f"Bearer {api_key}"})
        if worker_token is not None:
            _check_secret(worker_token, "worker_token")
            sent.update({WORKER_TOKEN_HEADER: worker_token,
                            "Authorization": f"Bearer {worker_token}"})
        return AppTarget(url, url, sent, None, [api_key, worker_token])
    raise GepaParameterError(
        "task_app must be a running InProcessTaskApp or the task app's URL (with api_key= or "
        f"worker_token=); got a {type(task_app).__name__}.")


def _check_secret(value: object, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise GepaParameterError(f"{what} must be a non-empty string.")
