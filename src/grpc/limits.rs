//! What one server gives its callers at most: calls in flight, connections, time per call,
//! and silence on an ingest stream. Past a limit a caller gets a clear status at once, never
//! a pile-up.

use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, Either};
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::{Layer, Service};

use super::auth::{Access, access_for};
use super::error::{QUEUE_PUSHBACK, retry_later};

/// The limits, all configurable (`serve --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// API calls in flight on this replica (a stream counts until it ends); past it, a call
    /// gets `RESOURCE_EXHAUSTED` at once. Health and reflection are not counted.
    pub max_concurrent_calls: usize,
    /// Open connections; past it, a new connection is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Concurrent calls on one HTTP/2 connection; the client queues the rest.
    pub max_streams_per_connection: u32,
    /// The longest a unary call may take, whatever deadline its client set (a shorter client
    /// deadline is honoured). Streams are bounded by their idle timeout instead.
    pub max_call_duration: Duration,
    /// How long an ingest stream may stay silent before it is closed.
    pub stream_idle_timeout: Duration,
    /// HTTP/2 pings on idle connections, and how long a ping may go unanswered before the
    /// connection is closed (so dead clients do not hold streams).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Limits {
    pub const DEFAULT: Self = Self {
        max_concurrent_calls: 1024,
        max_connections: 1024,
        max_streams_per_connection: 128,
        max_call_duration: Duration::from_secs(120),
        stream_idle_timeout: Duration::from_secs(60),
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(20),
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The paths of the API's streaming methods (either side), read from its descriptors: they
/// are bounded by the idle timeout, not by [`Limits::max_call_duration`].
fn streaming_paths() -> HashSet<String> {
    let set = prost_types::FileDescriptorSet::decode(super::proto::FILE_DESCRIPTOR_SET)
        .expect("the build embeds a valid descriptor set");
    let mut paths = HashSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                if method.client_streaming() || method.server_streaming() {
                    paths.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    paths
}

/// Admits API calls while fewer than [`Limits::max_concurrent_calls`] are in flight, and
/// ends unary ones at [`Limits::max_call_duration`].
///
/// Not tower's `ConcurrencyLimit` + `LoadShed`: those would also turn away health checks,
/// and a replica at its limit must still answer its probes.
#[derive(Debug, Clone)]
pub struct CallLimitsLayer {
    permits: Arc<Semaphore>,
    max_calls: usize,
    max_call_duration: Duration,
    streaming: Arc<HashSet<String>>,
}

impl CallLimitsLayer {
    pub fn new(limits: &Limits) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limits.max_concurrent_calls)),
            max_calls: limits.max_concurrent_calls,
            max_call_duration: limits.max_call_duration,
            streaming: Arc::new(streaming_paths()),
        }
    }
}

impl<S> Layer<S> for CallLimitsLayer {
    type Service = CallLimits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLimits {
            inner,
            limits: self.clone(),
        }
    }
}

/// The future of a call a layer may answer itself: the inner service's, or one that answers
/// at once.
pub(super) type Guarded<F, R, E> = Either<F, BoxFuture<'static, Result<R, E>>>;

/// A call answered by a layer with `status`, without reaching the handlers.
pub(super) fn refuse<F, B: Default + Send + 'static, E: Send + 'static>(
    status: Status,
) -> Guarded<F, http::Response<B>, E> {
    let response = status.into_http();
    Either::Right(Box::pin(async move { Ok(response) }))
}

/// The service [`CallLimitsLayer`] wraps.
#[derive(Debug, Clone)]
pub struct CallLimits<S> {
    inner: S,
    limits: CallLimitsLayer,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for CallLimits<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Guarded<S::Future, Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let path = request.uri().path();
        if access_for(path) == Access::Open {
            return Either::Left(self.inner.call(request));
        }
        let Ok(permit) = Arc::clone(&self.limits.permits).try_acquire_owned() else {
            let message = format!(
                "this replica is at its limit of {} calls in flight; retry with backoff",
                self.limits.max_calls
            );
            let status = retry_later(
                tonic::Code::ResourceExhausted,
                message,
                tonic::metadata::MetadataMap::new(),
                QUEUE_PUSHBACK,
            );
            return refuse(status);
        };
        let deadline =
            (!self.limits.streaming.contains(path)).then_some(self.limits.max_call_duration);
        let response = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let _permit: OwnedSemaphorePermit = permit;
            match deadline {
                None => response.await,
                Some(limit) => match tokio::time::timeout(limit, response).await {
                    Ok(response) => response,
                    // Dropping the call rolls back what it had not committed.
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "the call took longer than the server's limit of {limit:?}"
                    ))
                    .into_http()),
                },
            }
        }))
    }
}

/// Accepted connections, at most `max` open at once: one past it is closed at once (the
/// client sees the connection reset and retries, perhaps on another replica).
pub fn limit_connections<E>(
    incoming: impl Stream<Item = Result<TcpStream, E>> + Send + 'static,
    max: usize,
) -> impl Stream<Item = Result<CountedConnection, E>> + Send + 'static
where
    E: Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max));
    incoming.filter_map(move |accepted| {
        let permits = Arc::clone(&permits);
        async move {
            match accepted {
                Err(error) => Some(Err(error)),
                Ok(stream) => match permits.try_acquire_owned() {
                    Ok(permit) => Some(Ok(CountedConnection {
                        stream,
                        _permit: permit,
                    })),
                    Err(_) => {
                        tracing::warn!(
                            max,
                            peer = ?stream.peer_addr().ok(),
                            "connection refused: at the limit of open connections"
                        );
                        None
                    }
                },
            }
        }
    })
}

/// A connection that frees its place under the connection limit when it closes.
#[derive(Debug)]
pub struct CountedConnection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for CountedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for CountedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streaming_methods_come_from_the_descriptors() {
        let paths = streaming_paths();
        for path in [
            "/stats.v1.StatsService/StreamEvents",
            "/stats.v1.RolloutService/WatchRollout",
            "/stats.v1.MigrationService/WatchRun",
        ] {
            assert!(paths.contains(path), "{path}");
        }
        assert!(!paths.contains("/stats.v1.StatsService/RecordEvents"));
    }
}
