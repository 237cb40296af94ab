//! Whose token a call of a JWT bearer provider needs, and which key signs
//! the assertion for it.
//!
//! The subject is the caller's `email` (or user id); a tenant that stored
//! its own key signs with it, everyone else with the configured key. The
//! token is cached per (provider, subject) and remembers the key's
//! fingerprint: once the key in force is another (a tenant replaced its
//! key), the cached token is not used and the next call exchanges anew.

use std::sync::Arc;

use sidekey_vault::jwt::JwtGrant;
use sidekey_vault::{Credential, Owner, Store, StoreError};

use super::keys::{KeyError, SigningKey};
use super::settings::{JwtSettings, SubjectTemplate};
use crate::providers::Provider;

/// Why no grant can be made for a caller. The edge answers each with its
/// code: `credential_missing` (424) for the first and the third,
/// `subject_not_allowed` (403) for the second.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    #[error("the user has no email")]
    NoEmail,
    /// The subject's domain is not in `jwt_subject_domains`.
    #[error("subject outside the allowed domains")]
    NotAllowed(String),
    /// Neither the user's tenant nor the configuration has a key.
    #[error("no signing key")]
    NoKey,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key that signs for a subject.
#[derive(Clone, Debug)]
enum KeySource {
    File(Arc<SigningKey>),
    /// A tenant's stored key; read into a [`SigningKey`] only when an
    /// exchange needs it (a cached token needs its fingerprint alone).
    Tenant {
        tenant: String,
        record: Arc<Credential>,
    },
}

/// One caller's grant: subject, cache owner and key.
#[derive(Clone, Debug)]
pub struct SubjectGrant {
    pub subject: String,
    /// Where the subject's token is cached ([`Store::subject_owner`]).
    pub owner: Owner,
    key: KeySource,
    fingerprint: String,
}

impl SubjectGrant {
    /// Whether a cached token was got for this subject with this key.
    pub fn fits(&self, c: &Credential) -> bool {
        c.jwt
            .as_ref()
            .is_some_and(|j| j.fingerprint == self.fingerprint && j.subject == self.subject)
    }

    /// What a token got by this grant remembers.
    pub fn record(&self) -> JwtGrant {
        JwtGrant {
            subject: self.subject.clone(),
            tenant: match &self.key {
                KeySource::File(_) => None,
                KeySource::Tenant { tenant, .. } => Some(tenant.clone()),
            },
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// The key, ready to sign.
    pub fn signing_key(&self, s: &JwtSettings) -> Result<Arc<SigningKey>, KeyError> {
        match &self.key {
            KeySource::File(k) => Ok(k.clone()),
            KeySource::Tenant { record, .. } => {
                let k = record.jwt_key.as_ref().ok_or(KeyError::NotPem)?;
                SigningKey::from_pem(
                    k.private_key_pem.expose(),
                    s.alg,
                    k.key_id.clone(),
                    Some(k.issuer.clone()),
                )
                .map(Arc::new)
            }
        }
    }
}

/// The grant for `user`'s call of `p` (a JWT bearer provider).
pub async fn subject_grant(
    store: &Store,
    p: &Provider,
    user: &str,
) -> Result<SubjectGrant, SubjectError> {
    let s = p.jwt.as_deref().ok_or(SubjectError::NoKey)?;
    let profile = store.user_cached(user).await?;
    let subject = match s.subject {
        SubjectTemplate::Email => profile
            .as_ref()
            .and_then(|pr| pr.email.clone())
            .ok_or(SubjectError::NoEmail)?,
        SubjectTemplate::User => user.to_owned(),
    };
    if !s.domains.is_empty() {
        let domain = sidekey_base::users::email_domain(&subject);
        if !domain.is_some_and(|d| s.domains.contains(&d)) {
            return Err(SubjectError::NotAllowed(subject));
        }
    }
    let tenant = profile.as_ref().and_then(|pr| pr.tenant.clone());
    let key = key_for(store, p, s, tenant.as_deref()).await?;
    Ok(grant(store, subject, key))
}

/// The grant a cached token was got by (an upstream refused that token and
/// it must be exchanged again): same subject, the key now in force.
pub async fn grant_from_record(
    store: &Store,
    p: &Provider,
    info: &JwtGrant,
) -> Result<SubjectGrant, SubjectError> {
    let s = p.jwt.as_deref().ok_or(SubjectError::NoKey)?;
    let key = key_for(store, p, s, info.tenant.as_deref()).await?;
    Ok(grant(store, info.subject.clone(), key))
}

async fn key_for(
    store: &Store,
    p: &Provider,
    s: &JwtSettings,
    tenant: Option<&str>,
) -> Result<KeySource, SubjectError> {
    if let Some(t) = tenant {
        let owner = Owner::Tenant(t.to_owned());
        if let Some(record) = store.credential(&owner, p.credential_name()).await? {
            if record.jwt_key.is_some() {
                return Ok(KeySource::Tenant {
                    tenant: t.to_owned(),
                    record,
                });
            }
        }
    }
    s.key
        .clone()
        .map(KeySource::File)
        .ok_or(SubjectError::NoKey)
}

fn grant(store: &Store, subject: String, key: KeySource) -> SubjectGrant {
    let fingerprint = match &key {
        KeySource::File(k) => k.fingerprint.clone(),
        KeySource::Tenant { record, .. } => record
            .jwt_key
            .as_ref()
            .map(|k| k.fingerprint.clone())
            .unwrap_or_default(),
    };
    SubjectGrant {
        owner: store.subject_owner(&subject),
        subject,
        key,
        fingerprint,
    }
}
