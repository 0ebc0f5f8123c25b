"""Property-based fuzzing of the published OpenAPI schema with schemathesis, bounded: valid and
invalid bodies for every operation, no 5xx, and the server healthy and idle afterwards."""

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from server_helpers import engine_stats, start_server, tiny_engine_args, wait_until

from fapool.entrypoints.llm import build_engine

EXAMPLES = {"GET": 3, "HEAD": 1, "POST": 30}


@pytest.fixture(scope="module")
def server(tiny_text_model):
    # A short context keeps every generated request to a few milliseconds of engine time.
    srv = start_server(build_engine(tiny_engine_args(tiny_text_model, max_model_len=64)), max_waiting=64)
    yield srv
    srv.stop()


def fuzz_operation(op, mode, base_url: str, seen: Counter) -> None:
    """Up to EXAMPLES[method] generated requests against one operation; none may get a 5xx."""

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES[op.method.upper()],
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case):
        r = case.call(base_url=base_url, timeout=30)
        seen[(op.label, r.status_code)] += 1
        assert r.status_code < 500, (case.body, r.text)
        if r.status_code >= 400 and "json" in r.headers.get("content-type", ""):
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    fuzz()


def test_schema_fuzz_no_server_errors(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    seen: Counter = Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        fuzz_operation(op, GenerationMode.POSITIVE, server.base_url, seen)
        if op.method.upper() == "POST":
            fuzz_operation(op, GenerationMode.NEGATIVE, server.base_url, seen)
    # Both endpoints were reached with bodies they accepted and bodies they refused.
    for path in ("POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"):
        assert seen[(path, 200)] > 0 and seen[(path, 400)] > 0, seen
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert wait_until(lambda: engine_stats(server).num_running == 0)
    assert engine_stats(server).kv_blocks_used == 0
