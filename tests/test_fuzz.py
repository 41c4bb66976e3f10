"""Fuzz: schemathesis generates requests from /openapi.json against real uvicorn; none may get a 5xx, and
every answer must be one the schema documents: its status, content type, headers and body."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CONFORMANCE = [status_code_conformance, content_type_conformance, response_headers_conformance]
CONFORMANCE.append(response_schema_conformance)


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_built_from_the_schema_gets_a_server_error(case):
    response = case.call(timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    case.validate_response(response, checks=CONFORMANCE)
