//! Graceful shutdown: one cancellation token per process, triggered by SIGTERM or
//! SIGINT (or by the process itself). Long-running tasks select on
//! [`Shutdown::cancelled`] and finish their in-flight work before returning.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawn a task that triggers this shutdown on SIGTERM or SIGINT.
    pub fn listen_for_signals(&self) {
        let token = self.token.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(error) => {
                        tracing::error!(%error, "cannot listen for SIGTERM");
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received: draining"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received: draining"),
            }
            token.cancel();
        });
    }

    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// A child token: cancelled with this one, but cancellable on its own too.
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
        }
    }
}
