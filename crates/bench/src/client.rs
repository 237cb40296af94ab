//! The bench's HTTP clients: the keep-alive load client and the admin
//! API caller.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

use crate::sidekey_proc::Sidekey;

pub(crate) type BenchClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub(crate) fn build_client(roots_pem: &[Vec<u8>], http2: bool) -> BenchClient {
    let mut roots = rustls::RootCertStore::empty();
    for pem in roots_pem {
        for c in CertificateDer::pem_slice_iter(pem).flatten() {
            let _ = roots.add(c);
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let https = if http2 {
        b.enable_http2().wrap_connector(http)
    } else {
        b.enable_http1().wrap_connector(http)
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(usize::MAX);
    if http2 {
        builder.http2_only(true);
    }
    builder.build(https)
}

/// A plain-HTTP admin API caller.
pub(crate) struct Admin {
    pub(crate) client: BenchClient,
    pub(crate) base: String,
    pub(crate) auth: HeaderValue,
}

impl Admin {
    async fn call(&self, method: Method, path: &str, body: Value) -> Result<(u16, Value), String> {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(60), self.client.request(req))
            .await
            .map_err(|_| "admin call timed out".to_string())?
            .map_err(|e| format!("admin call failed: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// One sample of `/metrics`' value for `name` (a gauge or counter
    /// without labels).
    pub(crate) async fn metric(&self, name: &str) -> Option<f64> {
        let req = Request::builder()
            .uri(format!("{}/metrics", self.base))
            .header(header::AUTHORIZATION, self.auth.clone())
            .body(Full::new(Bytes::new()))
            .ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.client.request(req))
            .await
            .ok()?
            .ok()?;
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        let text = std::str::from_utf8(&bytes).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
    }

    pub(crate) async fn put_credential(
        &self,
        user: &str,
        provider: &str,
        body: Value,
    ) -> Result<(), String> {
        let (s, v) = self
            .call(
                Method::PUT,
                &format!("/v1/users/{user}/credentials/{provider}"),
                body,
            )
            .await?;
        if s != 200 {
            return Err(format!("PUT credential for {user}: {s} {v}"));
        }
        Ok(())
    }

    pub(crate) async fn session(&self, user: &str, providers: &[&str]) -> Result<String, String> {
        let (s, v) = self
            .call(
                Method::POST,
                "/v1/sessions",
                json!({"user": user, "providers": providers, "ttl_secs": 86_400}),
            )
            .await?;
        if s != 201 {
            return Err(format!("mint session for {user}: {s} {v}"));
        }
        v["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no token in {v}"))
    }
}

/// Polls GET /readyz on the agent listener until 200; the time it took.
pub(crate) async fn wait_ready(
    client: &BenchClient,
    url: &Uri,
    sk: &mut Sidekey,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = sk.exited() {
            return Err(format!(
                "sidekey exited ({st}) before it was ready:\n{}",
                sk.log_text()
            ));
        }
        let req = Request::get(url.clone())
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_millis(500), client.request(req)).await
        {
            if r.status() == StatusCode::OK {
                let _ = r.into_body().collect().await;
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("sidekey not ready within 60 s:\n{}", sk.log_text()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
