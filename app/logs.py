"""The service's logging: uvicorn's, with the app's loggers through the same handler, the request id on
every access line, and VIT_LOG_FORMAT=json for one JSON object per line.

vit-serve applies it in each of its processes (app/cli.py, app/model_process.py); under plain uvicorn the
app's loggers borrow uvicorn's handler (share_uvicorns_handler).
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from contextvars import ContextVar

from pythonjsonlogger.core import RESERVED_ATTRS
from uvicorn.config import LOGGING_CONFIG

# The request being answered, set by app.middleware.RequestId; uvicorn writes its access line from within
# the request's own task, so the line sees it.
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Give every record the id of the request it was logged for ("-" outside any request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def access_arguments(record: logging.LogRecord) -> tuple | None:
    """The arguments of uvicorn's access line, (client, method, path, HTTP version, status); None of another line."""
    return record.args if isinstance(record.args, tuple) and len(record.args) == 5 else None


class AccessFieldsFilter(logging.Filter):
    """uvicorn's access line as fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        if arguments := access_arguments(record):
            record.client_addr, record.method, record.path, record.http_version, record.status_code = arguments
        return True


class OwnHealthCheckFilter(logging.Filter):
    """Leave out the access lines of the image's own HEALTHCHECK (app.healthcheck): a ready answer to GET
    /health/ready from this machine's loopback. Docker asks every 10 s, and its line was most of an idle server's
    log, 8,640 a day among the requests that matter. A probe from elsewhere (Kubernetes', a load balancer's), or an
    answer but 200, is logged; /metrics counts them all. uvicorn's line has the root path (VIT_ROOT_PATH) before
    the path that was routed."""

    def __init__(self, root_path: str = "") -> None:
        super().__init__()
        self.ready_path = f"{root_path}/health/ready"

    def filter(self, record: logging.LogRecord) -> bool:
        if not (arguments := access_arguments(record)):
            return True
        client, method, path, _, status = arguments
        return not (method == "GET" and status == 200 and path == self.ready_path and _loopback(client))


def _loopback(client: str) -> bool:
    """Whether uvicorn's "host:port" of a client is this machine's loopback (127.0.0.1, ::1, ::ffff:127.0.0.1)."""
    try:
        address = ipaddress.ip_address(client.rpartition(":")[0])
    except ValueError:
        return False
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


# python-multipart warns of each body it cannot parse, with no handler of its own: Python's last-resort
# handler wrote the line bare, among JSON lines too, once per bad request. Its reason is in the 400's detail
# (app/errors.py), so only its errors are logged, through the service's handler.
MULTIPART_LOGGER = "python_multipart"
# The loggers that write through the service's handler, beside uvicorn's own, and from what level.
SERVICE_LOGGERS = {"app": "INFO", MULTIPART_LOGGER: "ERROR"}
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"
ACCESS_FIELDS = "%(client_addr)s %(method)s %(path)s %(status_code)s"


def log_config(log_format: str = "text", root_path: str = "") -> dict:
    """uvicorn's logging configuration, for `log_format` "text" (uvicorn's lines) or "json", of a server under
    `root_path` (VIT_ROOT_PATH)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {
        "request_id": {"()": RequestIdFilter},
        "access_fields": {"()": AccessFieldsFilter},
        "own_health_check": {"()": OwnHealthCheckFilter, "root_path": root_path},
    }
    config["handlers"]["default"]["filters"] = ["request_id"]
    config["handlers"]["access"]["filters"] = ["own_health_check", "request_id"]
    config["formatters"]["access"]["fmt"] += " %(request_id)s"
    if log_format == "json":  # uvicorn's text formatter reads the access line's arguments itself
        config["handlers"]["access"]["filters"].append("access_fields")
        # uvicorn passes its colored template as an extra, which the formatter wrote as a field of its own:
        # "color_message": "Started server process [\u001b[36m%d\u001b[0m]"
        json_formatter = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
        }
        config["formatters"]["default"] = json_formatter | {"fmt": JSON_FIELDS}
        config["formatters"]["access"] = json_formatter | {"fmt": f"{JSON_FIELDS} {ACCESS_FIELDS}"}
    for name, level in SERVICE_LOGGERS.items():
        config["loggers"][name] = {"handlers": ["default"], "level": level, "propagate": False}
    return config


def share_uvicorns_handler() -> None:
    """Under plain uvicorn (`uvicorn app.main:create_app --factory`), log the app's lines (and python-multipart's
    errors: SERVICE_LOGGERS) through uvicorn's own handler, as vit-serve does. uvicorn configures only its
    loggers: the app's INFO lines (which model, on which device) were dropped, and its warnings came through
    Python's last-resort handler without a level. A logging configuration that gives "app" or the root logger
    a handler of its own is left as it is."""
    app, uvicorn = logging.getLogger("app"), logging.getLogger("uvicorn")
    if app.handlers or logging.getLogger().handlers or not uvicorn.handlers:
        return
    for name, level in SERVICE_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = list(uvicorn.handlers), False
        logger.setLevel(level)
