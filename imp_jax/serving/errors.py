"""Errors as OpenAI sends them: a status code and ``{"error": {"message", "type", "param", "code"}}``.

Every way a request can fail ends here, so a client (the ``openai`` package raises by status) always gets one
shape, and no request can take the server down.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from imp_jax.errors import ContextOverflow, ImpError, RequestTooLarge


class APIError(Exception):
    """An answer other than 200, with what the client should read in it."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_imp_error(e: ImpError) -> APIError:
    """A request the engine or the template refused: always the client's to fix (400)."""
    code = "context_length_exceeded" if isinstance(e, ContextOverflow | RequestTooLarge) else None
    return APIError(400, " ".join(str(e).split()), code=code)


def install(app: FastAPI) -> None:
    """Route every failure of ``app`` to the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status, headers=e.headers)

    @app.exception_handler(ImpError)
    async def _imp(_: Request, e: ImpError) -> JSONResponse:
        err = from_imp_error(e)
        return JSONResponse(error_body(err.message, err.type, err.param, err.code), err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('msg', '')}"
        else:
            message = f"{param or 'the body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(message, "invalid_request_error", param, first.get("type")), 400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), 500)
