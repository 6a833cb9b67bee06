//! Serving HTTPS: Synapse deployments often expose 8448 directly, so the
//! federation-receiver can terminate TLS itself from PEM files (tests' fake
//! remote servers use the same code with a self-signed certificate).

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
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
            let stream = match acceptor.accept(tcp).await {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
            };
            let service = TowerToHyperService::new(routes);
            let builder = Builder::new(TokioExecutor::new());
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

    use tokio::sync::Notify;

    /// Shutdown stops new connections at once, and `serve` returns only once
    /// the request under way has been answered.
    #[tokio::test]
    async fn shutdown_lets_the_requests_under_way_finish() {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let acceptor = super::acceptor_from_pem(
            cert.cert.pem().as_bytes(),
            cert.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(super::serve(listener, acceptor, routes, async {
            let _ = stopped.await;
        }));
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
