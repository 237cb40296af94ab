//! A provider's JWT keys, resolved once at start: the algorithm, the
//! configured signing key (read and checked now, so a bad key stops
//! `check-config` and `serve` with a line naming the setting), the
//! audience, the scope claim and the subject rule.

use std::sync::Arc;

use sidekey_base::config::JwtConfig;

use super::keys::{JwtAlg, SigningKey};

/// Whose address or id a grant assertion's `sub` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectTemplate {
    /// `{email}`: the user's `email` (Google Workspace, Salesforce usernames).
    Email,
    /// `{user}`: the sidekey user id itself.
    User,
}

/// What a provider's JWT assertions are made of.
#[derive(Debug)]
pub struct JwtSettings {
    pub alg: JwtAlg,
    /// The configured key (`service_account_file` or `jwt_key_file`);
    /// `None`: every tenant stores its own.
    pub key: Option<Arc<SigningKey>>,
    /// `aud` of grant assertions; `None`: the token endpoint's URL.
    pub audience: Option<String>,
    /// Whether grant assertions carry a `scope` claim.
    pub scope_claim: bool,
    pub subject: SubjectTemplate,
    /// Lower-cased; empty: any.
    pub domains: Vec<String>,
    /// A service account's `token_uri`, used when the section names no
    /// `token_url` (as Google's libraries do).
    pub token_uri: Option<String>,
}

/// What the provider section decided, for the keys this module reads.
pub struct Needs<'a> {
    pub sec: &'a str,
    pub grant: bool,
    pub client_assertion: bool,
    pub client_id: Option<&'a str>,
    /// The preset's audience and scope-claim defaults.
    pub preset_audience: Option<&'static str>,
    pub preset_scope_claim: bool,
}

/// Resolves the JWT keys; problems go to `p`, remarks to `notes`.
pub fn resolve(
    c: &JwtConfig,
    n: &Needs<'_>,
    p: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Option<Arc<JwtSettings>> {
    let sec = n.sec;
    let any_key = c.any_grant_key()
        || c.key_file.is_some()
        || c.issuer.is_some()
        || c.key_id.is_some()
        || c.alg.is_some();
    if !n.grant && !n.client_assertion {
        if any_key {
            p.push(format!("{sec} jwt_* keys and service_account_file apply only with grant = \"jwt_bearer\" or client_auth = \"private_key_jwt\""));
        }
        return None;
    }
    if !n.grant && c.any_grant_key() {
        p.push(format!("{sec} service_account_file, jwt_audience, jwt_scope_claim, jwt_subject and jwt_subject_domains apply only with grant = \"jwt_bearer\""));
    }
    let alg = match c.alg.as_deref() {
        None => JwtAlg::Rs256,
        Some(a) => JwtAlg::parse(a).unwrap_or_else(|| {
            p.push(format!(
                "{sec} jwt_alg = {a:?}: use \"RS256\" (default), \"ES256\" or \"PS256\""
            ));
            JwtAlg::Rs256
        }),
    };
    if c.service_account_file.is_some() && c.key_file.is_some() {
        p.push(format!(
            "{sec} give service_account_file or jwt_key_file, not both"
        ));
    }
    let mut token_uri = None;
    let mut key = None;
    if let Some(path) = &c.service_account_file {
        if c.key_id.is_some() || c.issuer.is_some() {
            p.push(format!("{sec} jwt_key_id and jwt_issuer come from the service account (private_key_id, client_email); remove them"));
        }
        match std::fs::read_to_string(path) {
            Err(e) => p.push(format!(
                "{sec} service_account_file: cannot read {}: {e}",
                path.display()
            )),
            Ok(text) => match SigningKey::from_service_account(&text, alg) {
                Ok((k, sa)) => {
                    token_uri = sa.token_uri;
                    key = Some(Arc::new(k));
                }
                Err(e) => p.push(format!(
                    "{sec} service_account_file {}: {e}",
                    path.display()
                )),
            },
        }
    }
    if let Some(path) = &c.key_file {
        let issuer = c.issuer.clone().or_else(|| n.client_id.map(str::to_owned));
        if issuer.is_none() && n.grant {
            p.push(format!("{sec} jwt_key_file needs jwt_issuer (the assertions' iss: a service account's address, or the app's client id)"));
        }
        match std::fs::read_to_string(path) {
            Err(e) => p.push(format!(
                "{sec} jwt_key_file: cannot read {}: {e}",
                path.display()
            )),
            Ok(pem) => match SigningKey::from_pem(&pem, alg, c.key_id.clone(), issuer) {
                Ok(k) => key = Some(Arc::new(k)),
                Err(e) => p.push(format!("{sec} jwt_key_file {}: {e}", path.display())),
            },
        }
    }
    if n.client_assertion {
        if c.service_account_file.is_none() && c.key_file.is_none() {
            p.push(format!(
                "{sec} client_auth = \"private_key_jwt\" needs jwt_key_file (the key that signs the client assertions)"
            ));
        }
        if n.client_id.is_none() {
            p.push(format!(
                "{sec} client_auth = \"private_key_jwt\" needs client_id (the assertions' iss and sub)"
            ));
        }
    }
    let subject = match c.subject.as_deref() {
        None | Some("{email}") => SubjectTemplate::Email,
        Some("{user}") => SubjectTemplate::User,
        Some(o) => {
            p.push(format!(
                "{sec} jwt_subject = {o:?}: use \"{{email}}\" (default) or \"{{user}}\""
            ));
            SubjectTemplate::Email
        }
    };
    let mut domains = Vec::new();
    for d in &c.subject_domains {
        match sidekey_base::users::normalize_email(&format!("x@{d}")) {
            Some(e) => domains.push(e[2..].to_owned()),
            None => p.push(format!(
                "{sec} jwt_subject_domains: {d:?} is not a domain name, e.g. \"acme.com\""
            )),
        }
    }
    if n.grant && key.is_none() && c.service_account_file.is_none() && c.key_file.is_none() {
        notes.push(format!("{sec} grant = \"jwt_bearer\" has no service_account_file or jwt_key_file: only users whose tenant stored its own key (PUT /v1/tenants/{{tenant}}/credentials/{{provider}}) can be served"));
    }
    let audience = c
        .audience
        .clone()
        .or_else(|| n.preset_audience.map(str::to_owned));
    if let Some(a) = &audience {
        if a.is_empty() || a.len() > 2048 || a.chars().any(char::is_control) {
            p.push(format!(
                "{sec} jwt_audience must be 1-2048 characters without control characters"
            ));
        }
    }
    Some(Arc::new(JwtSettings {
        alg,
        key,
        audience,
        scope_claim: c.scope_claim.unwrap_or(n.preset_scope_claim),
        subject,
        domains,
        token_uri,
    }))
}
