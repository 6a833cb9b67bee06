//! Serving HTTP listeners: the accept loop every role's public listener runs,
//! with the timeouts a listener facing the internet needs and a drain on
//! shutdown.
//!
//! `axum::serve` sets no timer, so hyper's header read timeout never fires
//! under it and a peer that opens connections and sends nothing (or half a
//! request) holds a socket and a task for each, for ever. Here every
//! connection must send its first byte within a time limit (that also covers
//! the HTTP/2 preface, and the bytes hyper reads to tell HTTP/1.1 from
//! HTTP/2), and an HTTP/1.1 connection must finish each request's headers
//! within another ([`Timeouts`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How long a peer may keep a connection without sending a request.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// How long a new connection may take to send its first byte.
    pub first_byte: Duration,
    /// How long an HTTP/1.1 connection may take over each request's
    /// headers, counted from when hyper starts waiting for them: after the
    /// previous answer, so it is also how long a kept-alive connection may
    /// sit idle.
    pub headers: Duration,
}

impl Timeouts {
    /// `headers` is above the 60 s that nginx (and ingress-nginx) keep idle
    /// upstream connections, so a proxy in front never sends a request on a
    /// connection we are just closing; a client keeping connections longer
    /// (hyper's client pool keeps them 90 s) must retry or lower its pool's
    /// idle timeout.
    pub const STANDARD: Timeouts = Timeouts {
        first_byte: Duration::from_secs(30),
        headers: Duration::from_secs(75),
    };
}

/// Serve `routes` over plain HTTP (HTTP/1.1, or HTTP/2 with prior
/// knowledge) until `shutdown` resolves; see [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    routes: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    let plain = |tcp, _| async move { Some(tcp) };
    serve_with(listener, routes, Timeouts::STANDARD, shutdown, plain).await
}

/// Serve `routes` on the connections `listener` accepts, each first passed
/// through `handshake` (TLS, say; `None` drops the connection) and then held
/// to `timeouts`, until `shutdown` resolves. Then stop accepting, and return
/// once the requests under way are answered (each connection closes after
/// its current request), so a rolling restart cuts no request short.
pub async fn serve_with<H, F, Io>(
    listener: TcpListener,
    routes: axum::Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
    handshake: H,
) where
    H: Fn(TcpStream, SocketAddr) -> F + Clone + Send + 'static,
    F: Future<Output = Option<Io>> + Send,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::pin!(shutdown);
    let connections = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    on_accept_error(error).await;
                    continue;
                }
            },
        };
        // Request/response traffic otherwise waits on delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let (handshake, routes, watcher) =
            (handshake.clone(), routes.clone(), connections.watcher());
        tokio::spawn(async move {
            let Some(stream) = handshake(tcp, peer).await else {
                return;
            };
            let io = TokioIo::new(FirstByteDeadline::new(stream, timeouts.first_byte));
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.headers);
            let connection = builder.serve_connection(io, TowerToHyperService::new(routes));
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = connections.count();
    if open > 0 {
        tracing::info!(open, "finishing the requests under way");
    }
    connections.shutdown().await;
}

/// A peer that gave up before we accepted it costs nothing; anything else
/// (out of file descriptors, above all) would recur at once, so wait a
/// little rather than spin on it.
async fn on_accept_error(error: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(%error, "accept failed; pausing the listener for a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A stream whose reads fail with `TimedOut` if no byte has arrived by the
/// deadline; once one has, it is the stream itself.
struct FirstByteDeadline<Io> {
    io: Io,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<Io> FirstByteDeadline<Io> {
    fn new(io: Io, within: Duration) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for FirstByteDeadline<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = &mut this.deadline else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.deadline = None,
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request began within the first-byte timeout",
                )));
            }
            _ => {}
        }
        polled
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for FirstByteDeadline<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// For tests of listeners, here and in other crates.
#[cfg(any(test, feature = "test-util"))]
pub mod testing {
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncReadExt};

    /// Timeouts a test can wait out.
    pub const SHORT: super::Timeouts = super::Timeouts {
        first_byte: Duration::from_millis(300),
        headers: Duration::from_millis(300),
    };

    /// Whether the server closes `stream` (EOF or reset) within 10 s.
    pub async fn closed_by_server(mut stream: impl AsyncRead + Unpin) -> bool {
        let mut buffer = [0u8; 1024];
        let read = async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::Notify;

    use super::testing::{SHORT, closed_by_server};

    /// A server on loopback, the stop for it, and its task.
    struct Server {
        address: std::net::SocketAddr,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(routes: axum::Router) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(super::serve_with(
            listener,
            routes,
            SHORT,
            async {
                let _ = stopped.await;
            },
            |tcp, _| async move { Some(tcp) },
        ));
        Server {
            address,
            stop,
            task,
        }
    }

    /// Reads the server's whole answer on `stream` (it closes the
    /// connection) and checks it is a 200 whose body is `body`.
    async fn assert_answered(stream: &mut TcpStream, body: &str) {
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(body), "{answer}");
    }

    fn hello() -> axum::Router {
        axum::Router::new().route("/", axum::routing::get(|| async { "hi" }))
    }

    /// A peer that connects and sends nothing, or half a request's headers,
    /// is disconnected; one that sends a whole request is answered.
    #[tokio::test]
    async fn peers_that_stall_are_disconnected() {
        let server = start(hello()).await;

        let mut silent = TcpStream::connect(server.address).await.unwrap();
        assert!(closed_by_server(&mut silent).await, "nothing sent: closed");

        let mut half = TcpStream::connect(server.address).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(closed_by_server(&mut half).await, "half headers: closed");

        let mut whole = TcpStream::connect(server.address).await.unwrap();
        whole
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert_answered(&mut whole, "hi").await;
    }

    /// A connection that has sent its first byte is not cut by the first-byte
    /// deadline: a request whose body takes longer than the header timeout
    /// still gets its answer.
    #[tokio::test]
    async fn a_slow_body_after_the_headers_is_not_cut() {
        let routes = axum::Router::new().route(
            "/echo",
            axum::routing::post(|body: String| async move { body }),
        );
        let server = start(routes).await;
        let mut tcp = TcpStream::connect(server.address).await.unwrap();
        tcp.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\n\r\nab",
        )
        .await
        .unwrap();
        tokio::time::sleep(SHORT.first_byte.max(SHORT.headers) * 2).await;
        tcp.write_all(b"cd").await.unwrap();
        assert_answered(&mut tcp, "abcd").await;
    }

    /// Shutdown stops new connections at once, and `serve` returns only once
    /// the request under way has been answered.
    #[tokio::test]
    async fn shutdown_lets_the_requests_under_way_finish() {
        let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let routes = axum::Router::new().route(
            "/slow",
            axum::routing::get({
                let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
                move || async move {
                    entered.notify_one();
                    release.notified().await;
                    "answered"
                }
            }),
        );
        let Server {
            address,
            stop,
            task: server,
        } = start(routes).await;
        let mut request = TcpStream::connect(address).await.unwrap();
        request
            .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        entered.notified().await;
        stop.send(()).unwrap();

        // New connections are refused (bounded wait), while serve still
        // waits for the request under way.
        let mut refused = false;
        for _ in 0..100 {
            if TcpStream::connect(address).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "the listener closed on shutdown");
        assert!(
            !server.is_finished(),
            "serve waits for the request under way"
        );

        release.notify_one();
        assert_answered(&mut request, "answered").await;
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns once the request is answered")
            .unwrap();
    }
}
