"""An API key for the Ray Serve OpenAI endpoint (`streamsink serve --ray --api-key KEY`).

Ray Serve's HTTP proxy and Ray Serve LLM's OpenAI ingress check no credentials (Ray's token
authentication guards Ray's control plane, not Serve's HTTP data plane), and vLLM's --api-key
belongs to vLLM's own server, which Ray Serve replaces. So this rebuilds what build_openai_app
builds for one model (the ingress app, the LLM deployment, the model card), on Ray Serve LLM's
own pieces, with one middleware added in front: vLLM's rule, `Authorization: Bearer KEY` on every
/v1 route. Without --api-key the plain build_openai_app is used.
"""
from __future__ import annotations

import hmac

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse


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


def build_openai_app_with_key(llm_config, key: str):
    """build_openai_app({"llm_configs": [llm_config]}) with the key check in front."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import (
        OpenAiIngress,
        init,
        make_fastapi_ingress,
    )
    from ray.serve.llm import build_llm_deployment

    app = init()
    app.add_middleware(BearerKeyMiddleware, key=key)
    ingress_cls = make_fastapi_ingress(OpenAiIngress, app=app)
    model_id = llm_config.model_id
    return serve.deployment(ingress_cls, **OpenAiIngress.get_deployment_options([llm_config])) \
        .bind(llm_deployments={model_id: build_llm_deployment(llm_config)},
              model_cards={model_id: to_model_metadata(model_id, llm_config)},
              lora_paths={})
