//! Serving HTTPS: Synapse deployments often expose 8448 directly, so the
//! federation-receiver can terminate TLS itself from PEM files (tests' fake
//! remote servers use the same code with a self-signed certificate).

use std::sync::Arc;
use std::time::Duration;

use tessera_runtime::http::Timeouts;
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

/// A peer that has not finished its TLS handshake by then is dropped: a
/// listener exposed directly (8448) has no proxy in front to cut off peers
/// that open connections and then stall, each holding a socket and a task.
/// Once the handshake is done, the timeouts of every HTTP listener apply.
const HANDSHAKE_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(10)
};
#[cfg(not(test))]
const TIMEOUTS: Timeouts = Timeouts::STANDARD;
#[cfg(test)]
const TIMEOUTS: Timeouts = tessera_runtime::http::testing::SHORT;

/// Serve `routes` over TLS until `shutdown` resolves, then drain as
/// [`tessera_runtime::http::serve_with`] does, so a rolling restart cuts no
/// transaction short.
pub async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    routes: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handshake = move |tcp, peer: std::net::SocketAddr| {
        let acceptor = acceptor.clone();
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => Some(stream),
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    None
                }
            }
        }
    };
    tessera_runtime::http::serve_with(listener, routes, TIMEOUTS, shutdown, handshake).await
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tessera_runtime::http::testing::closed_by_server;
    use tokio::io::AsyncWriteExt;

    /// A TLS server on loopback, the stop for it, and its certificate.
    pub(crate) struct Server {
        pub(crate) address: std::net::SocketAddr,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
        certificate: rustls::pki_types::CertificateDer<'static>,
    }

    pub(crate) async fn start(routes: axum::Router) -> Server {
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

    /// A peer that connects and never starts its TLS handshake, or finishes
    /// it and then sends nothing or never finishes a request's headers, is
    /// disconnected.
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
        let connect = || async {
            let tcp = tokio::net::TcpStream::connect(server.address)
                .await
                .unwrap();
            connector
                .connect("127.0.0.1".try_into().unwrap(), tcp)
                .await
                .expect("handshake")
        };

        let quiet = connect().await;
        assert!(
            closed_by_server(quiet).await,
            "nothing after the handshake: closed"
        );

        let mut half = connect().await;
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(
            closed_by_server(half).await,
            "headers never finished: closed"
        );
    }

    /// A request over TLS is answered, and shutdown waits for it.
    #[tokio::test]
    async fn answers_over_tls_and_drains_on_shutdown() {
        let routes = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
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
        let response = client
            .get(format!("https://{address}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "hi");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns on shutdown")
            .unwrap();
    }
}
