//! The records the store keeps, as the rest of sidekey sees them:
//! credentials and whose they are, sessions, user profiles, OAuth states
//! and audit entries, and the outcomes of the store's rules on them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::jwt;
use sidekey_base::secret::Secret;

/// A user's (or tenant's, or the app's) credential for one provider.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Credential {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// Unix seconds; `None` when the provider gave no lifetime.
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Set when the token endpoint refused the refresh token: no further
    /// refresh is attempted until the credential is replaced.
    #[serde(default)]
    pub reauth_required: bool,
    /// Why the credential needs reconnecting (the provider's error code,
    /// e.g. `invalid_grant`), shown by the admin API. Never a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reauth_reason: Option<String>,
    /// When sidekey last refreshed this token itself (unix seconds): the
    /// refresh tool's cooldown, the same on every replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_at: Option<i64>,
    #[serde(default)]
    pub updated_at: i64,
    /// Bumped on every write, so a request can tell whether the credential
    /// it used has been replaced since.
    #[serde(default)]
    pub generation: u64,
    /// Per-connection values (`[providers.NAME.connection.FIELD]`): a
    /// Zendesk subdomain, a Salesforce instance URL. Not secrets, but
    /// sealed with the rest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connection: BTreeMap<String, String>,
    /// A tenant's signing key for a JWT bearer provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_key: Option<jwt::JwtKey>,
    /// On a token got by a JWT bearer exchange: its subject and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<jwt::JwtGrant>,
}

impl Credential {
    /// `active`, `expired` or `reauth_required`.
    pub fn status(&self, now: i64) -> &'static str {
        if self.reauth_required {
            "reauth_required"
        } else if self.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        }
    }
}

/// Whose credential: a user's own, a tenant's shared one, the app-level
/// token of a client-credentials provider, or the token a JWT bearer grant
/// got for one subject (by the keyed hash of the subject, so record keys
/// never list anyone's address: [`Store::subject_owner`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    User(String),
    Tenant(String),
    App,
    Subject(String),
}

impl Owner {
    /// `u/{user}/`, `t/{tenant}/` or `a/`.
    pub(crate) fn prefix(&self) -> String {
        self.key("")
    }

    /// `prefix` + provider, built by hand rather than with `format!`:
    /// every proxied request looks its credential up by this key.
    pub fn key(&self, provider: &str) -> String {
        let (tag, id) = match self {
            Owner::User(u) => ("u/", Some(u.as_str())),
            Owner::Tenant(t) => ("t/", Some(t.as_str())),
            Owner::App => ("a/", None),
            Owner::Subject(h) => ("s/", Some(h.as_str())),
        };
        let id_len = id.map_or(0, |i| i.len() + 1);
        let mut k = String::with_capacity(tag.len() + id_len + provider.len());
        k.push_str(tag);
        if let Some(id) = id {
            k.push_str(id);
            k.push('/');
        }
        k.push_str(provider);
        k
    }

    pub fn describe(&self) -> String {
        match self {
            Owner::User(u) => format!("user {u}"),
            Owner::Tenant(t) => format!("tenant {t}"),
            Owner::App => "app".into(),
            Owner::Subject(h) => format!("subject {}", &h[..h.len().min(12)]),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRecord {
    pub user: String,
    pub providers: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    #[serde(default)]
    pub conv: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserProfile {
    #[serde(default)]
    pub phone_numbers: Vec<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub updated_at: i64,
    /// The user's address: the subject of JWT bearer grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OAuthState {
    pub user: String,
    pub provider: String,
    pub verifier: Secret,
    pub return_to: Option<String>,
    pub redirect_uri: String,
    pub expires_at: i64,
    /// Record id ([`Store::connect_ticket_id`]) of the connect link this
    /// flow belongs to: the callback completes only in the browser bound
    /// to that ticket.
    #[serde(default)]
    pub ticket: Option<String>,
    /// Per-connection values the flow was started with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connection: BTreeMap<String, String>,
}

/// A request method's name for an audit record; the standard ones without
/// an allocation.
pub fn method_name(m: &http::Method) -> std::borrow::Cow<'static, str> {
    use http::Method;
    match *m {
        Method::GET => "GET".into(),
        Method::POST => "POST".into(),
        Method::PUT => "PUT".into(),
        Method::PATCH => "PATCH".into(),
        Method::DELETE => "DELETE".into(),
        Method::HEAD => "HEAD".into(),
        Method::OPTIONS => "OPTIONS".into(),
        _ => m.as_str().to_owned().into(),
    }
}

/// One audit entry: who did what, when. Never a token or a body.
///
/// The audit writer stores a record as the JSON array of these fields in
/// this order (older records are objects; serde reads both). So a field is
/// only ever added at the end, with `#[serde(default)]`, and never
/// reordered or removed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    /// Unix milliseconds.
    pub time: i64,
    /// `proxy`, `admin`, `refresh`, `oauth`, `webhook`. `Cow`: the request
    /// path records fixed names without allocating them.
    pub kind: std::borrow::Cow<'static, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub method: std::borrow::Cow<'static, str>,
    /// Path without query string.
    pub path: String,
    pub status: u16,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// sidekey's error code when it answered with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The operation tool called (`/v1/tools`, MCP, Vapi, Retell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The subject a JWT bearer grant acted for (an address or a user id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BindOutcome {
    /// The session is (now, or already) bound to this conversation.
    Bound,
    /// It is bound to a different conversation.
    Mismatch,
    /// The session no longer exists.
    Gone,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PutUserError {
    PhoneTaken { phone: String, user: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_method_names() {
        assert_eq!(method_name(&http::Method::GET), "GET");
        assert_eq!(method_name(&http::Method::OPTIONS), "OPTIONS");
        let custom = http::Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(method_name(&custom), "PROPFIND");
    }

    #[test]
    fn owner_keys() {
        assert_eq!(Owner::User("alice".into()).key("slack"), "u/alice/slack");
        assert_eq!(Owner::Tenant("acme".into()).key("google"), "t/acme/google");
        assert_eq!(Owner::App.key("bench"), "a/bench");
        assert_eq!(Owner::User("alice".into()).prefix(), "u/alice/");
        assert_eq!(Owner::App.prefix(), "a/");
    }
}
