"""Patch (Ray): an API key on the Ray Serve OpenAI endpoint (`streamsink serve --ray --api-key`).

Why: Ray Serve's HTTP proxy and Ray Serve LLM's OpenAI ingress check no credentials (Ray's token
authentication guards Ray's control plane, not Serve's HTTP data plane), and vLLM's --api-key
belongs to vLLM's own server, which Ray Serve replaces. ray.serve.llm's public
build_openai_app takes no middleware.
How: rebuild what build_openai_app builds for one model (the ingress app, the LLM deployment,
the model card) from Ray Serve LLM's own pieces, which live in ray.llm._internal, with one
middleware added in front: vLLM's rule, `Authorization: Bearer KEY` on every /v1 route. Without
a key the plain build_openai_app is used and nothing here runs.
Delete when: ray.serve.llm's build_openai_app accepts middleware (or an API key).
"""
from __future__ import annotations

import hmac
import importlib
import inspect

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse

from streamsink.errors import PatchTargetMoved
from streamsink.patches import check_ray_version
from streamsink.patches._install import require

INGRESS = "ray.llm._internal.serve.core.ingress.ingress"
METADATA = "ray.llm._internal.serve.core.configs.openai_api_models"


class BearerKeyMiddleware(BaseHTTPMiddleware):
    """401 for a /v1 request without `Authorization: Bearer <key>` (vLLM's --api-key rule)."""

    def __init__(self, app, key: str) -> None:
        super().__init__(app)
        self.expected = f"Bearer {key}".encode()

    async def dispatch(self, request, call_next):
        if request.method != "OPTIONS" and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                return JSONResponse({"error": {"message": "Unauthorized", "type":
                                               "invalid_request_error", "code": 401}},
                                    status_code=401)
        return await call_next(request)


def check_target() -> None:
    check_ray_version()
    ingress = importlib.import_module(INGRESS)
    for name in ("OpenAiIngress", "init", "make_fastapi_ingress"):
        require(ingress, name)
    require(importlib.import_module(METADATA), "to_model_metadata")
    params = list(inspect.signature(require(ingress.OpenAiIngress, "__init__")).parameters)
    if params[:4] != ["self", "llm_deployments", "model_cards", "lora_paths"] and \
            not {"llm_deployments", "model_cards"} <= set(params):
        raise PatchTargetMoved(f"OpenAiIngress.__init__{tuple(params)} changed")


def build_openai_app_with_key(llm_config, key: str):
    """build_openai_app({"llm_configs": [llm_config]}) with the key check in front."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    check_target()
    ingress = importlib.import_module(INGRESS)
    to_model_metadata = importlib.import_module(METADATA).to_model_metadata
    app = ingress.init()
    app.add_middleware(BearerKeyMiddleware, key=key)
    ingress_cls = ingress.make_fastapi_ingress(ingress.OpenAiIngress, app=app)
    model_id = llm_config.model_id
    options = ingress.OpenAiIngress.get_deployment_options([llm_config])
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={model_id: build_llm_deployment(llm_config)},
        model_cards={model_id: to_model_metadata(model_id, llm_config)},
        lora_paths={})
