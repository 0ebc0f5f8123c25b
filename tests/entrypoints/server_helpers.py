"""Helpers for the entrypoint tests: tiny-model engine args, in-process servers, and reading
the engine's state through its thread."""

from __future__ import annotations

import asyncio
import time

from fapool.engine.arg_utils import EngineArgs
from fapool.entrypoints.server import BackgroundServer, ServerSettings, create_app

def tiny_engine_args(folder: str, **kw) -> EngineArgs:
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    return EngineArgs(model=folder, device="cpu", dtype="float32", **kw)


def start_server(engine, name: str = "tiny", **settings) -> BackgroundServer:
    settings.setdefault("shutdown_timeout_s", 5.0)
    return BackgroundServer(create_app(engine, ServerSettings(name, **settings))).start()


def slow_down(engine, seconds: float) -> None:
    """Make each engine step take at least `seconds` (so tests can catch requests mid-flight)."""
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step


def engine_stats(server: BackgroundServer):
    """Fresh EngineStats, read on the engine thread."""
    return asyncio.run(server.app.state.engine.call(lambda e: e.stats()))


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def metric(server: BackgroundServer, name: str, **labels) -> float:
    """Sum of the samples of a Prometheus metric whose labels include `labels`."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{server.base_url}/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
