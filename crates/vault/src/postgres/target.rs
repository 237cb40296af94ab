//! The database URL as sidekey reads it: libpq's `sslmode` and
//! `sslrootcert` (which tokio-postgres does not know) turned into rustls
//! settings, a connect timeout and an application name by default.

use std::sync::Arc;

use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PgOptions;
use crate::OpenError;

/// Pooled connections are named `sidekey <owner>` unless the URL names them.
pub(super) const DEFAULT_APPLICATION_NAME: &str = "sidekey";

/// A parsed URL and the TLS it asks for.
pub(super) struct Target {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: MakeRustlsConnect,
}

pub(super) fn parse_target(opts: &PgOptions) -> Result<Target, OpenError> {
    let bad = |why: String| OpenError::Other(format!("{}: {why}", opts.setting));
    let (url, sslmode, rootcert) = split_tls_params(opts.url.expose());
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| bad(format!("not a valid PostgreSQL URL ({e})")))?;
    let verify = match sslmode.as_deref() {
        None | Some("prefer") => {
            config.ssl_mode(SslMode::Prefer);
            false
        }
        Some("disable") | Some("allow") => {
            config.ssl_mode(SslMode::Disable);
            false
        }
        Some("require") => {
            config.ssl_mode(SslMode::Require);
            // libpq verifies a `require` connection when a root cert is given.
            rootcert.is_some()
        }
        Some("verify-ca") | Some("verify-full") => {
            config.ssl_mode(SslMode::Require);
            true
        }
        Some(other) => {
            return Err(bad(format!(
                "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(opts.op_timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name(DEFAULT_APPLICATION_NAME);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS setup: {e}")))?;
    let tls = if verify {
        let mut roots = rustls::RootCertStore::empty();
        match &rootcert {
            Some(path) => {
                for c in sidekey_base::tls::load_roots(&std::path::PathBuf::from(path))
                    .map_err(|e| bad(format!("sslrootcert: {e}")))?
                {
                    roots.add(c).map_err(|e| bad(format!("sslrootcert: {e}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        // libpq's prefer/require encrypt without checking the certificate;
        // verify-full is what checks it.
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    };
    Ok(Target {
        config,
        tls: MakeRustlsConnect::new(tls),
    })
}

/// Removes `sslmode` and `sslrootcert` (tokio-postgres knows only some
/// modes and no root-cert parameter), returning them.
fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let mut sslmode = None;
    let mut rootcert = None;
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), None, None);
        };
        let mut kept = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "sslmode" => sslmode = Some(v.into_owned()),
                "sslrootcert" => rootcert = Some(v.into_owned()),
                _ => {
                    kept.append_pair(&k, &v);
                }
            }
        }
        let kept = kept.finish();
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{kept}")
        };
        (url, sslmode, rootcert)
    } else {
        let mut parts = Vec::new();
        for p in url.split_whitespace() {
            match p.split_once('=') {
                Some(("sslmode", v)) => sslmode = Some(v.to_owned()),
                Some(("sslrootcert", v)) => rootcert = Some(v.to_owned()),
                _ => parts.push(p),
            }
        }
        (parts.join(" "), sslmode, rootcert)
    }
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidekey_base::secret::Secret;
    use std::time::Duration;

    #[test]
    fn tls_params_are_split_from_urls() {
        let (u, m, r) = split_tls_params(
            "postgresql://u@db/sk?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        );
        assert_eq!(u, "postgresql://u@db/sk?application_name=x");
        assert_eq!(m.as_deref(), Some("verify-full"));
        assert_eq!(r.as_deref(), Some("/ca.pem"));
        let (u, m, _) = split_tls_params("postgresql://postgres@/sk?host=/run/postgresql");
        assert_eq!(u, "postgresql://postgres@/sk?host=%2Frun%2Fpostgresql");
        assert!(m.is_none());
        let (u, m, _) = split_tls_params("host=/tmp dbname=sk sslmode=disable");
        assert_eq!(u, "host=/tmp dbname=sk");
        assert_eq!(m.as_deref(), Some("disable"));
    }

    #[test]
    fn unix_socket_urls_parse() {
        let opts = PgOptions {
            setting: "store.postgres_url".into(),
            url: Secret::new("postgresql://postgres@/sk?host=/run/postgresql&sslmode=disable"),
            pool_size: 4,
            op_timeout: Duration::from_secs(1),
        };
        let t = parse_target(&opts).unwrap();
        assert!(matches!(
            t.config.get_hosts()[0],
            tokio_postgres::config::Host::Unix(_)
        ));
        assert_eq!(t.config.get_dbname(), Some("sk"));
        let bad = PgOptions {
            url: Secret::new("postgresql://x/y?sslmode=sometimes"),
            ..opts
        };
        let err = parse_target(&bad).err().unwrap().to_string();
        assert!(
            err.starts_with("store.postgres_url: sslmode=sometimes"),
            "{err}"
        );
    }
}
