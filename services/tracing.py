"""OpenTelemetry tracing, with context carried in gRPC metadata across every hop.

The exporter is chosen by `SPLITSERVE_OTEL_EXPORTER`: `none` (default: spans are created but
dropped cheaply), `console`, or `otlp` (endpoint from the standard `OTEL_EXPORTER_OTLP_ENDPOINT`).

    init_tracing("router")
    with tracer().start_as_current_span("router.generate"):
        metadata = inject_metadata()          # pass as `metadata=` on the outgoing call
    ...
    with tracer().start_as_current_span("decode.generate", context=extract_context(ctx)):
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

log = logging.getLogger("splitserve")
_TRACER_NAME = "splitserve"


def init_tracing(
    service_name: str, exporter: str | None = None, span_exporter: SpanExporter | None = None
) -> None:
    """Install a tracer provider for this process. `span_exporter` overrides (tests)."""
    kind = (exporter or os.environ.get("SPLITSERVE_OTEL_EXPORTER", "none")).lower()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif kind == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif kind != "none":
        raise ValueError(f"SPLITSERVE_OTEL_EXPORTER={kind!r}: use none, console or otlp")
    trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


def inject_metadata(extra: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current span context (W3C traceparent)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*extra, *carrier.items())


def extract_context(grpc_context) -> otel_context.Context:
    """The caller's trace context from an incoming grpc.aio call's metadata."""
    metadata = grpc_context.invocation_metadata() or ()
    carrier = {k: v for k, v in metadata if isinstance(v, str)}
    return propagate.extract(carrier)


@contextlib.contextmanager
def stream_span(name: str, grpc_context) -> Iterator[trace.Span]:
    """A span that is current around a streaming handler's body: `start_as_current_span` for an
    async generator.

    grpc.aio may close a stream's generator from another task than the one that ran it (a
    server stopping with streams open): OpenTelemetry's own detach then fails in that foreign
    Context and logs a traceback. Here the span still ends, and the Context is only restored
    where it was changed.
    """
    span = tracer().start_span(name, context=extract_context(grpc_context))
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit | asyncio.CancelledError):
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()
        if isinstance(token, contextvars.Token):
            with contextlib.suppress(ValueError):  # made in another Context: not ours to undo
                token.var.reset(token)
        else:
            otel_context.detach(token)
