"""The routes synth-ai's configs switch on, added by ``create_task_app``.

``POST /validate-candidate`` when ``TaskAppConfig.validate_candidate`` is set (synth-ai 0.9's
shapes), ``GET /debug/env`` when ``expose_debug_env`` (which keys are set, never a value),
and a warning for vendor ``proxy`` routes, which are not served. See
docs/sdk-compatibility.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError

from .auth import KEY_ENV
from .contract import http_error, invoke, positional_arity
from .models import TaskAppConfig, ValidateCandidateRequest, ValidateCandidateResponse

__all__ = ["add_sdk_routes"]

logger = logging.getLogger(__name__)


def add_sdk_routes(app: FastAPI, cfg: TaskAppConfig, auth: list[Any]) -> None:
    """Add the routes synth-ai's config fields switch on (see the module docstring)."""
    validator = cfg.validate_candidate
    if validator is not None:

        @app.post("/validate-candidate", dependencies=auth)
        async def validate_candidate(
            body: ValidateCandidateRequest, request: Request
        ) -> dict[str, Any]:
            args = (body, request)[: min(2, max(1, positional_arity(validator)))]
            result = await invoke(validator, *args)
            if isinstance(result, BaseModel):
                result = result.model_dump(mode="json")
            try:
                checked = ValidateCandidateResponse.model_validate(result)
            except ValidationError as exc:
                raise http_error(
                    500,
                    "invalid_validate_candidate_response",
                    f"validate_candidate() of task app {cfg.app_id!r} returned something that "
                    f"is not a ValidateCandidateResponse: {exc.error_count()} error(s), first: "
                    f"{exc.errors()[0]['msg']}",
                ) from None
            return checked.model_dump(mode="json")

    if cfg.expose_debug_env:

        @app.get("/debug/env", dependencies=auth)
        async def debug_env() -> dict[str, Any]:
            # Presence only: unlike the SDK, no prefix of any key is ever shown.
            names = (KEY_ENV, "OPENAI_API_KEY", "GROQ_API_KEY", "SYNTH_API_KEY")
            return {f"has_{name}": bool(os.environ.get(name)) for name in names}

    proxy = cfg.proxy
    if proxy is not None and (
        getattr(proxy, "enable_openai", False) or getattr(proxy, "enable_groq", False)
    ):
        logger.warning(
            "Task app %r: TaskAppConfig.proxy enables vendor proxy routes "
            "(/proxy/v1/chat/completions, /proxy/groq/...); taskapp_notebook does not serve "
            "them. Call the policy's inference_url, or build the app with synth-ai's own "
            "create_container to keep them.",
            cfg.app_id,
        )
