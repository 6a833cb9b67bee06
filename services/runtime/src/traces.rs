//! OpenTelemetry traces: the OTLP exporter (off unless
//! `telemetry.otlp_endpoint` is set) and W3C trace context (`traceparent`)
//! carried across every hop between processes: HTTP headers, gRPC metadata
//! and Redis stream entries. With no exporter installed, spans carry no
//! OpenTelemetry context and nothing is injected, so the hops cost nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TelemetryConfig;

/// The exporter's provider; dropping it does not flush (see [`shutdown`]).
pub struct Exporter {
    provider: SdkTracerProvider,
}

/// Build the OTLP exporter and the tracing layer that feeds it, for `role`
/// (the `service.name` is `tessera-<role>`). Must run inside the tokio
/// runtime: the gRPC exporter's connection lives there.
pub fn exporter_layer<S>(
    config: &TelemetryConfig,
    role: &str,
) -> anyhow::Result<Option<(impl tracing_subscriber::Layer<S>, Exporter)>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(config.export_interval_ms))
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(format!("tessera-{role}"))
                .build(),
        )
        .build();
    let tracer = provider.tracer("tessera");
    let layer = tracing_opentelemetry::layer().with_tracer(tracer);
    Ok(Some((layer, Exporter { provider })))
}

/// Send what is left and stop the exporter (blocks: run off the runtime's
/// worker threads, as the SDK asks).
pub async fn shutdown(exporter: Exporter) {
    let _ = tokio::task::spawn_blocking(move || {
        let _ = exporter.provider.force_flush();
        let _ = exporter.provider.shutdown();
    })
    .await;
}

fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Single(Option<String>);

impl Injector for Single {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

struct FromTraceparent<'a>(&'a str);

impl Extractor for FromTraceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// Put the current span's context into outgoing HTTP headers.
pub fn inject_headers(headers: &mut http::HeaderMap) {
    let context = tracing::Span::current().context();
    propagator().inject_context(&context, &mut HeaderInjector(headers));
}

/// Make `span` a child of the context in incoming HTTP headers, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let _ = span.set_parent(propagator().extract(&HeaderExtractor(headers)));
    }
}

/// The current span's `traceparent`, for carriers that are not headers
/// (Redis stream entries). `None` when no trace is being recorded.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut single = Single(None);
    propagator().inject_context(&context, &mut single);
    single.0
}

/// Make `span` a child of a `traceparent` value.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    let _ = span.set_parent(propagator().extract(&FromTraceparent(traceparent)));
}

/// A tonic client interceptor: the caller's span context into the request's
/// metadata.
pub fn inject_grpc(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    if let Some(value) = current_traceparent().and_then(|v| v.parse().ok()) {
        request.metadata_mut().insert("traceparent", value);
    }
    Ok(request)
}

/// The gRPC server side: each call runs in a span that continues the
/// caller's trace, and is counted and timed by method and status
/// (`tessera_grpc_server_requests_total`, `tessera_grpc_server_request_seconds`).
#[derive(Clone, Copy, Default)]
pub struct GrpcServerLayer;

impl<S> tower::Layer<S> for GrpcServerLayer {
    type Service = GrpcServer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServer { inner }
    }
}

#[derive(Clone)]
pub struct GrpcServer<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcServer<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let span = tracing::info_span!("grpc", otel.name = %method, otel.kind = "server");
        set_parent_from_headers(&span, request.headers());
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let response = future.await;
                // Unary errors are trailers-only responses: the status is a header.
                let code = match &response {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("0")
                        .to_owned(),
                    Err(_) => "transport".to_owned(),
                };
                metrics::counter!("tessera_grpc_server_requests_total", "method" => method.clone(), "code" => code)
                    .increment(1);
                metrics::histogram!("tessera_grpc_server_request_seconds", "method" => method)
                    .record(started.elapsed().as_secs_f64());
                response
            }
            .instrument(span),
        )
    }
}
