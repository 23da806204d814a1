"""stream_span: a streaming handler's span, safe when grpc.aio closes the stream elsewhere."""

from __future__ import annotations

import asyncio
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from splitserve.services.tracing import init_tracing, inject_metadata, stream_span, tracer


class FakeCall:  # what stream_span reads of a grpc.aio ServicerContext
    def __init__(self, metadata):
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata


@pytest.fixture(scope="module")
def spans():
    exporter = InMemorySpanExporter()
    init_tracing("test", span_exporter=exporter)
    return exporter


def test_a_stream_closed_from_another_task_ends_its_span_without_a_traceback(spans, caplog):
    spans.clear()
    with tracer().start_as_current_span("caller") as caller:
        metadata = inject_metadata()

    async def handler():
        with stream_span("svc.Stream", FakeCall(metadata)) as span:
            assert trace.get_current_span() is span
            for i in range(10):
                yield i

    async def main():
        gen = handler()
        assert await gen.__anext__() == 0  # started in this task's Context ...
        await asyncio.create_task(gen.aclose())  # ... closed in another's, as a server stopping

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert "Failed to detach context" not in caplog.text
    (span,) = [s for s in spans.get_finished_spans() if s.name == "svc.Stream"]
    assert span.status.is_ok
    assert span.parent.span_id == caller.get_span_context().span_id  # the caller's trace
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left current here


def test_an_error_in_the_stream_is_recorded(spans):
    spans.clear()

    async def handler():
        with stream_span("svc.Stream", FakeCall(())):
            yield 1
            raise ValueError("bad chunk")

    async def main():
        return [x async for x in handler()]

    with pytest.raises(ValueError):
        asyncio.run(main())
    (span,) = spans.get_finished_spans()
    assert not span.status.is_ok and "bad chunk" in span.status.description
    assert span.events[0].name == "exception"
