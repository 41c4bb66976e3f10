"""FastAPI dependencies: the running service (or 503), admission of inference requests, and the API key
that VIT_API_KEY asks of them (or 401); and the route class that admits an upload before its body is read."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.datastructures import State

from app.service import ModelService, unavailable
from app.uploads import check_multipart


def running_service(request: Request) -> ModelService | None:
    """The service if it is loaded and not shutting down, else None."""
    return service_of(request.app.state)


def service_of(state: State) -> ModelService | None:
    """The app's service if it is loaded and not shutting down, else None; what the gRPC service asks too."""
    service: ModelService | None = getattr(state, "service", None)
    return service if service is not None and service.ready and service.backend.alive else None


async def get_service(request: Request) -> ModelService:
    """The running service, or 503. Async on purpose: FastAPI runs a sync dependency on a worker thread."""
    return required_service(request.app.state)


def required_service(state: State) -> ModelService:
    """The app's running service, or 503 (the gRPC service's UNAVAILABLE)."""
    service = service_of(state)
    if service is None:
        raise unavailable("the model is not ready, or the server is shutting down")
    return service


async def no_query_parameters(request: Request) -> None:
    """A route without parameters refuses any (422, by name), as the others refuse unknown ones."""
    if request.query_params:
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": "Extra inputs are not permitted",
                    "input": value,
                }
                for name, value in request.query_params.multi_items()
            ]
        )


async def one_value_each(request: Request) -> None:
    """A query parameter given twice (?top_k=1&top_k=3) is a 422 by name: FastAPI keeps the last value, and
    the answer would silently differ from what the first asked."""
    values: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        values.setdefault(name, []).append(value)
    if repeated := {name: given for name, given in values.items() if len(given) > 1}:
        raise RequestValidationError(
            [
                {
                    "type": "repeated",
                    "loc": ("query", name),
                    "msg": f"given {len(given)} times ({', '.join(map(repr, given[:4]))}); give it once",
                }
                for name, given in repeated.items()
            ]
        )


class Admission(HTTPBearer):
    """The dependency of every inference request: authorized (401), then running (503).

    It is also the API's HTTP bearer security scheme, so that /docs offers the key. A dependency that
    had the scheme as a sub-dependency would cost every request FastAPI's solving of one more
    dependant. The route counts the request in flight (ModelService.answering).
    """

    async def __call__(self, request: Request) -> ModelService:
        credentials = await super().__call__(request)
        authorize(request.app.state.settings.api_key, credentials)
        return await get_service(request)


admit = Admission(auto_error=False, scheme_name="HTTPBearer", description="the server's VIT_API_KEY, when it sets one")


class AdmittedRoute(APIRoute):
    """An upload route whose request is admitted (`admit`) from its headers, before FastAPI reads its body.

    FastAPI reads a route's body before it solves the route's dependencies, so an upload that admission
    refuses, 401 without the key or 503 while the model is not ready or the server drains, was received,
    parsed and spooled first. Refused here, as is a body that is not multipart (check_multipart), it is not
    read, and the answer closes the connection, so that it is not received either. The route's dependency
    admits it again once the body is in, since the server may have begun to drain meanwhile, and gives the
    route its service.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                await admit(request)
                check_multipart(request.headers)
            except HTTPException as error:
                headers = (error.headers or {}) | {"Connection": "close"}
                raise HTTPException(error.status_code, error.detail, headers) from None
            return await handler(request)

        return handle


def authorize(key: SecretStr | None, credentials: HTTPAuthorizationCredentials | None) -> None:
    """Nothing without VIT_API_KEY; with it, the header `Authorization: Bearer <key>` or 401."""
    if key is None:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    if not secrets.compare_digest(given, key.get_secret_value().encode()):
        reason = "a wrong API key" if credentials is not None else "no API key"
        raise HTTPException(
            401,
            f"{reason}: this server needs the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


ServiceDep = Annotated[ModelService, Depends(get_service)]
AdmittedServiceDep = Annotated[ModelService, Depends(admit)]  # authorized and running
