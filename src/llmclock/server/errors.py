"""Every error leaves as OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx
for anything the client did: validation failures are 400 (not FastAPI's 422), and a 500 only for
a fault of the server itself."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import LLMClockError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_exceeded",
         503: "server_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _where(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        request.state.error = e.message
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        where = _where(first.get("loc", ()))
        msg = f"{where}: {first.get('msg', 'invalid')}" + (f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else "")
        return await api_error(request, APIError(400, msg, param=where))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return await api_error(request, APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)))

    @app.exception_handler(LLMClockError)
    async def user_error(request: Request, e: LLMClockError):
        return await api_error(request, APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def server_fault(request: Request, e: Exception):
        logging.getLogger("llmclock.server").exception("unhandled error on %s", request.url.path)
        return await api_error(request, APIError(500, "internal server error", type="server_error"))
