//! Serving HTTPS: Synapse deployments often expose 8448 directly, so the
//! federation-receiver can terminate TLS itself from PEM files (tests' fake
//! remote servers use the same code with a self-signed certificate).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio_rustls::TlsAcceptor;

/// A TLS acceptor from PEM files; the error says which file is wrong.
pub fn acceptor(cert_path: &str, key_path: &str) -> Result<TlsAcceptor, String> {
    let cert_pem = std::fs::read(cert_path)
        .map_err(|e| format!("cannot read TLS certificate {cert_path}: {e}"))?;
    let key_pem =
        std::fs::read(key_path).map_err(|e| format!("cannot read TLS key {key_path}: {e}"))?;
    acceptor_from_pem(&cert_pem, &key_pem)
}

pub fn acceptor_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, String> {
    crate::install_tls_provider();
    let certs: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid certificate PEM: {e}"))?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("invalid key PEM: {e}"))?
        .ok_or("no private key in the key PEM")?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the TLS certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A peer that has not finished its TLS handshake by then is dropped, and
/// one that has not sent a request's headers (HTTP/1.1) by
/// [`HEADER_TIMEOUT`] after the last request is closed: a listener exposed
/// directly (8448) has no proxy in front to cut off peers that open
/// connections and then stall, each holding a socket and a task.
const HANDSHAKE_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(10)
};
const HEADER_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(30)
};

/// Serve `routes` over TLS until `shutdown` resolves; then stop accepting,
/// and return once the requests under way are answered (each connection
/// closes after its current request, as `axum::serve`'s graceful shutdown
/// does for plain HTTP), so a rolling restart cuts no transaction short.
pub async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    routes: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let connections = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, routes, watcher) = (acceptor.clone(), routes.clone(), connections.watcher());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = TowerToHyperService::new(routes);
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    /// A TLS server on loopback, the stop for it, and its certificate.
    struct Server {
        address: std::net::SocketAddr,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
        certificate: rustls::pki_types::CertificateDer<'static>,
    }

    async fn start(routes: axum::Router) -> Server {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let acceptor = super::acceptor_from_pem(
            cert.cert.pem().as_bytes(),
            cert.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(super::serve(listener, acceptor, routes, async {
            let _ = stopped.await;
        }));
        Server {
            address,
            stop,
            task,
            certificate: cert.cert.der().clone(),
        }
    }

    /// Whether the server closes `stream` (EOF or reset) within 10 s.
    async fn closed_by_server(mut stream: impl tokio::io::AsyncRead + Unpin) -> bool {
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

    /// A peer that connects and never starts its TLS handshake, or finishes
    /// it and never finishes a request's headers, is disconnected.
    #[tokio::test]
    async fn peers_that_stall_are_disconnected() {
        let routes = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let server = start(routes).await;

        let silent = tokio::net::TcpStream::connect(server.address)
            .await
            .unwrap();
        assert!(closed_by_server(silent).await, "no handshake: dropped");

        let mut roots = rustls::RootCertStore::empty();
        roots.add(server.certificate.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(server.address)
            .await
            .unwrap();
        let mut tls = connector
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .expect("handshake");
        tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(
            closed_by_server(tls).await,
            "headers never finished: closed"
        );
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
            ..
        } = start(routes).await;
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let request = tokio::spawn(client.get(format!("https://{address}/slow")).send());
        entered.notified().await;
        stop.send(()).unwrap();

        // New connections are refused (bounded wait), while serve still
        // waits for the request under way.
        let mut refused = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(address).await.is_err() {
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
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "answered");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns once the request is answered")
            .unwrap();
    }
}
