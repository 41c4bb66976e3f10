"""The one error shape of the API, `{"detail": "<a sentence>"}`, for every status, validation included.

Routes raise HTTPException where a fault arises; these handlers only shape the answer. FastAPI's own
422 body is a list of objects (`[{"loc": ["body", "file"], "msg": "Field required"}]`): here it
becomes one sentence that names each offending parameter, and, for a missing upload, says how to send
one and which parts the request had. Under /v2, the Open Inference Protocol's routes, the key is "error"
(error_body).
"""

from __future__ import annotations

import errno
import logging
import tempfile
from urllib.parse import urlencode

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.utils import is_body_allowed_for_status_code
from python_multipart.exceptions import MultipartParseError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Scope

logger = logging.getLogger("app.errors")
PLACES = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "field"}
SHOWN_CHARACTERS = 100  # of an offending value, in the sentence that names it
SHOWN_PARTS = 5  # of the names of a request's parts, when none is 'file'
SEND_AS_MULTIPART = "send the image as multipart/form-data, in a part named 'file'"
PROTOCOL_PREFIX = "/v2"  # the Open Inference Protocol's routes (app/routes/open_inference.py)


def error_body(scope: Scope, detail: object) -> dict[str, object]:
    """`{"detail": ...}`, FastAPI's shape; under PROTOCOL_PREFIX `{"error": ...}`, the key that the protocol's
    clients read (tritonclient, given another, said only "an exception occurred in the client while decoding the
    response"). Chosen by the path, so that the router's 404 and 405 there, and the 413 that BodyLimits answers
    before any route runs, have it too. Under a root path (VIT_ROOT_PATH), the path that is routed counts."""
    return {"error" if under_protocol(scope) else "detail": detail}


def under_protocol(scope: Scope) -> bool:
    """Whether the request is to one of the Open Inference Protocol's routes, under the root path if any."""
    routed = scope["path"][len(root_prefix(scope)) :]
    return routed == PROTOCOL_PREFIX or routed.startswith(PROTOCOL_PREFIX + "/")


def root_prefix(scope: Scope) -> str:
    """The root path (VIT_ROOT_PATH) that uvicorn puts before the path a route sees, where the path has it."""
    path, root = scope["path"], scope.get("root_path", "")
    return root if root and path.startswith(root + "/") else ""


async def answer_http_error(request: Request, error: StarletteHTTPException) -> Response:
    """FastAPI's answer, in error_body's shape, except when an upload could not be stored.

    Its body parser answers any failure 400 "There was an error parsing the body". Multipart parts of
    over 1 MB spool to the temporary directory; when that is full, read-only, or missing (a container
    whose root file system is read-only finds none), the fault is the server's: 507, logged.
    """
    cause = error.__cause__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        logger.error("an upload could not be stored in %s: %s", tempfile.gettempdir(), cause)
        return JSONResponse(
            error_body(request.scope, "the server has no space left to receive the upload; try again later"),
            507,
            headers={"Retry-After": "30"},
        )
    if isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.ENOENT):
        logger.error("an upload could not be stored in a temporary file: %s; set TMPDIR to a writable folder", cause)
        detail = "the server has no writable temporary directory to receive the upload"
        return JSONResponse(error_body(request.scope, detail), 507)
    # Starlette answers every fault of python-multipart's parser "Invalid multipart data.": the parser's
    # reason (a part's header line over its limit, a boundary that is not the declared one) says what to fix.
    context = error.__context__
    if isinstance(context, MultiPartException) and isinstance(context.__cause__, MultipartParseError):
        detail = f"invalid multipart body: {context.__cause__}"
        return JSONResponse(error_body(request.scope, detail), error.status_code)
    if not is_body_allowed_for_status_code(error.status_code):
        return Response(status_code=error.status_code, headers=error.headers)
    detail = error.detail
    if error.status_code == 405 and (error.headers or {}).get("Allow") == "POST" and not under_protocol(request.scope):
        # /predict or /attention: `curl -T image.png`, as TorchServe takes an image, PUTs it raw
        detail = f"{request.method} is not answered here: {SEND_AS_MULTIPART}, in a POST (curl -F file=@image.png)"
    return JSONResponse(error_body(request.scope, detail), error.status_code, headers=error.headers)


async def answer_validation_error(request: Request, error: RequestValidationError) -> Response:
    return JSONResponse(error_body(request.scope, validation_sentence(request, error)), 422)


def validation_sentence(request: Request, error: RequestValidationError) -> str:
    """FastAPI's validation errors as one sentence, each offending parameter by name, and the parts of an upload
    that the route does not read in one clause (a thousand of them made a thousand)."""
    sentences, unread, file_missing = [], [], False
    for problem in error.errors():
        if problem["type"] == "extra_forbidden" and problem["loc"][0] == "body":
            unread.append(problem)
            continue
        file_missing = file_missing or (tuple(problem["loc"]) == ("body", "file") and problem["type"] == "missing")
        sentences.append(_problem(problem, error.body))
    if unread and not file_missing:  # else the sentence on the missing file names the parts already
        sentences.append(_unread_parts(request, unread))
    return "; ".join(sentences)


def _problem(problem: dict, body: object) -> str:
    place, *path = problem["loc"]
    name = ".".join(str(part) for part in path)
    if place == "body" and name == "file" and problem["type"] == "missing":
        return _missing_file(body)
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden":
        message = "not a parameter of this route"
    elif place == "body" and path[0] == "file" and isinstance(problem.get("input"), str):
        # a part without a filename, which Starlette reads as text: `curl -F file=<image.png` sends one
        message = "a text field, not a file; send the image as a file, with a filename (curl -F file=@image.png)"
    elif problem["type"] != "missing" and "input" in problem:
        message += f", not {quoted(problem['input'])}"
    return f"{PLACES.get(place, place)} {name!r}: {message}"


def quoted(value: object) -> str:
    """An offending value in an error, as Python writes it, cut to SHOWN_CHARACTERS: a form field of a
    megabyte was sent back whole."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else f"{text[:SHOWN_CHARACTERS]}... ({len(text)} characters)"


def _unread_parts(request: Request, problems: list[dict]) -> str:
    """Parts beside the images: `curl -F top_k=2` sent a parameter as a form field, which was dropped unread."""
    names = [quoted(str(problem["loc"][1])) for problem in problems[:SHOWN_PARTS]]
    more = f" and {len(problems) - SHOWN_PARTS} more" if len(problems) > SHOWN_PARTS else ""
    route = request.url.path
    sentence = f"{'part' if len(problems) == 1 else 'parts'} {', '.join(names)}{more} not read"
    sentence += f": {route} reads images from parts named 'file'"
    fields = [problem for problem in problems if isinstance(problem.get("input"), str)]
    if not fields:
        return sentence
    example = urlencode({fields[0]["loc"][1]: fields[0]["input"]})  # as a client would send it: 'a b' is a+b
    shown = f" ({route}?{example})" if len(example) <= 40 else ""
    return f"{sentence}, and parameters from the query string{shown}"


def _missing_file(body: object) -> str:
    """A multipart body without a 'file' part (another body is refused from its Content-Type: check_multipart)."""
    if isinstance(body, FormData) and len(body):  # a thousand parts of long names made a 1 MB answer
        names = [quoted(name) for name in list(body)[:SHOWN_PARTS]]
        more = f" and {len(body) - SHOWN_PARTS} more" if len(body) > SHOWN_PARTS else ""
        return f"{SEND_AS_MULTIPART}; this request's parts are named {', '.join(names)}{more}"
    return f"{SEND_AS_MULTIPART}; this request has no parts"
