//! A provider's JWT settings as written: the keys of a `jwt_bearer` grant
//! (RFC 7523 §2.1) and of `client_auth = "private_key_jwt"` (§2.2).
//!
//! Only paths are resolved here; reading the key files, checking the
//! algorithm and the subject template is the creds layer's job, where the
//! grant and the preset are known, so every message can say what to fix.

use std::path::{Path, PathBuf};

use super::{RawProvider, resolve};

/// `[providers.NAME]`'s `jwt_*` keys and `service_account_file`.
#[derive(Clone, Debug, Default)]
pub struct JwtConfig {
    /// A Google service-account JSON key file: issuer, key, key id and
    /// token endpoint in one.
    pub service_account_file: Option<PathBuf>,
    /// `iss` of the assertions when no service account names one.
    pub issuer: Option<String>,
    /// PEM private key (PKCS#1, PKCS#8 or SEC1) that signs the assertions.
    pub key_file: Option<PathBuf>,
    /// Header `kid` for `key_file`'s assertions.
    pub key_id: Option<String>,
    /// `RS256` (default), `ES256` or `PS256`.
    pub alg: Option<String>,
    /// `aud` of the grant assertions (default: the preset's, else `token_url`).
    pub audience: Option<String>,
    /// Whether grant assertions carry the scopes as a `scope` claim.
    pub scope_claim: Option<bool>,
    /// `{email}` (default) or `{user}`.
    pub subject: Option<String>,
    /// Subjects must be addresses in one of these domains; empty: any.
    pub subject_domains: Vec<String>,
}

impl JwtConfig {
    pub(super) fn from_raw(dir: &Path, rp: &RawProvider) -> JwtConfig {
        JwtConfig {
            service_account_file: rp.service_account_file.as_deref().map(|f| resolve(dir, f)),
            issuer: rp.jwt_issuer.clone(),
            key_file: rp.jwt_key_file.as_deref().map(|f| resolve(dir, f)),
            key_id: rp.jwt_key_id.clone(),
            alg: rp.jwt_alg.clone(),
            audience: rp.jwt_audience.clone(),
            scope_claim: rp.jwt_scope_claim,
            subject: rp.jwt_subject.clone(),
            subject_domains: rp.jwt_subject_domains.clone().unwrap_or_default(),
        }
    }

    /// Whether any key of a JWT bearer grant is set.
    pub fn any_grant_key(&self) -> bool {
        self.service_account_file.is_some()
            || self.audience.is_some()
            || self.scope_claim.is_some()
            || self.subject.is_some()
            || !self.subject_domains.is_empty()
    }
}
