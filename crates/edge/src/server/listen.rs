//! The listeners: binding them, TLS for the agent one (ALPN, and a
//! fallback for clients that offer none), and accepting within each
//! listener's connection budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use sidekey_base::errors::Fatal;

/// The two bound listeners.
pub struct Listeners {
    /// Agent-facing (ElevenLabs, browsers for OAuth callbacks).
    pub agent: TcpListener,
    /// Main-app-facing admin API.
    pub admin: TcpListener,
    /// `/metrics` and health without a token (`[admin] metrics_listen`).
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(agent: SocketAddr, admin: SocketAddr) -> Result<Listeners, Fatal> {
        let a = TcpListener::bind(agent).await.map_err(|e| {
            Fatal::new(format!(
                "server.listen: cannot listen on {agent}: {e}; pick a free address or stop whatever holds it"
            ))
        })?;
        let b = TcpListener::bind(admin).await.map_err(|e| {
            Fatal::new(format!(
                "admin.listen: cannot listen on {admin}: {e}; pick a free address or stop whatever holds it"
            ))
        })?;
        Ok(Listeners {
            agent: a,
            admin: b,
            metrics: None,
        })
    }

    /// Every listener the config names: agent, admin and, if set, metrics.
    pub async fn for_config(cfg: &sidekey_base::config::Config) -> Result<Listeners, Fatal> {
        Listeners::bind(cfg.server.listen, cfg.admin.listen)
            .await?
            .with_metrics(cfg.admin.metrics_listen)
            .await
    }

    /// Adds the optional metrics listener.
    pub async fn with_metrics(mut self, addr: Option<SocketAddr>) -> Result<Listeners, Fatal> {
        if let Some(addr) = addr {
            self.metrics = Some(TcpListener::bind(addr).await.map_err(|e| {
                Fatal::new(format!(
                    "admin.metrics_listen: cannot listen on {addr}: {e}; pick a free address or remove it"
                ))
            })?);
        }
        Ok(self)
    }
}

/// Connections the admin listener serves at once.
pub(super) const ADMIN_CONNECTIONS: usize = 256;
/// Connections the token-less metrics listener serves at once: its own
/// budget, so scrapers and probes cannot starve the admin API (nor the
/// reverse).
pub(super) const METRICS_CONNECTIONS: usize = 64;

/// TLS for the agent listener: the configured ALPN list (h2, http/1.1),
/// and the same config without ALPN for clients that offer neither
/// (`http/1.0` only, or an unknown protocol). rustls would refuse those
/// with `no_application_protocol`; like nginx, sidekey answers them over
/// HTTP/1.1 instead.
#[derive(Clone)]
pub(super) struct Tls {
    main: Arc<rustls::ServerConfig>,
    no_alpn: Arc<rustls::ServerConfig>,
}

impl Tls {
    pub(super) fn new(main: Arc<rustls::ServerConfig>) -> Tls {
        let mut no_alpn = (*main).clone();
        no_alpn.alpn_protocols.clear();
        Tls {
            main,
            no_alpn: Arc::new(no_alpn),
        }
    }

    pub(super) fn for_hello(
        &self,
        hello: &rustls::server::ClientHello<'_>,
    ) -> Arc<rustls::ServerConfig> {
        match hello.alpn() {
            Some(mut offered) => {
                let ours = &self.main.alpn_protocols;
                if offered.any(|p| ours.iter().any(|o| o.as_slice() == p)) {
                    self.main.clone()
                } else {
                    self.no_alpn.clone()
                }
            }
            None => self.main.clone(),
        }
    }
}

/// `accept` on a listener that may not be configured (then never resolves).
pub(super) async fn accept_optional(
    listener: Option<&TcpListener>,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    match listener {
        Some(l) => accept(l, slots).await,
        None => std::future::pending().await,
    }
}

/// Accepts one connection once a slot is free. Accept errors (e.g. out of
/// file descriptors) back off instead of ending the loop.
pub(super) async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    let permit = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((s, p)) => {
            let _ = s.set_nodelay(true);
            Some((s, p, permit))
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed; backing off");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}
