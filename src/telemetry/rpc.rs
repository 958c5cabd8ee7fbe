//! The tower layer that times every call and counts it by method and status code.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tower::{Layer, Service};

use super::ServerMetrics;
use crate::domain::StorageSource;

/// Times each call until its response headers and records it in [`ServerMetrics`], with the
/// storage that answered when a read handler says so (a [`StorageSource`] response extension).
///
/// Unary and client-streaming calls carry their failure status in the headers
/// (a trailers-only response), so their code is exact; a server stream is counted as
/// opened (`Ok`) unless it failed before its first message.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<ServerMetrics>,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Arc<ServerMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the server.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<ServerMetrics>,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for RpcMetrics<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResponseBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        let metrics = Arc::clone(&self.metrics);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let (code, source) = match &response {
                Ok(response) => (
                    status_in_headers(response.headers()),
                    response.extensions().get::<StorageSource>().copied(),
                ),
                Err(_) => (tonic::Code::Internal, None),
            };
            metrics.observe_rpc(&path, code, source, started.elapsed());
            response
        })
    }
}

/// The `grpc-status` of a trailers-only response; `Ok` when the status comes later, in the
/// trailers.
fn status_in_headers(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}
