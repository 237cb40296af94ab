//! Signing the two assertions of RFC 7523: the grant (§2.1, "act for this
//! subject") and the client authentication (§2.2, "this is our client").

use base64::Engine;
use jsonwebtoken::Header;
use serde::Serialize;

use super::keys::SigningKey;
use sidekey_base::secret::Secret;

/// Seconds a grant assertion is valid: within Google's hour and
/// Salesforce's three minutes, and long enough for a clock a little behind.
pub const GRANT_LIFETIME_SECS: i64 = 180;
/// Seconds a client assertion is valid (RFC 7523 §3 wants it short; every
/// token request signs a new one).
pub const CLIENT_ASSERTION_LIFETIME_SECS: i64 = 120;

/// `grant_type` of a JWT bearer grant.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// `client_assertion_type` of private_key_jwt.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

#[derive(Serialize)]
struct GrantClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    iat: i64,
    exp: i64,
}

#[derive(Serialize)]
struct ClientClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: &'a str,
    iat: i64,
    exp: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot sign the assertion: {0}")]
pub struct SignError(String);

/// What a grant assertion says, besides the key's own `kid`.
pub struct GrantClaimsInput<'a> {
    pub issuer: &'a str,
    pub subject: &'a str,
    pub audience: &'a str,
    /// Space-separated; `None` leaves the claim out.
    pub scope: Option<&'a str>,
    pub now: i64,
}

fn header(key: &SigningKey) -> Header {
    let mut h = Header::new(key.alg.algorithm());
    h.kid = key.key_id.clone();
    h.typ = Some("JWT".into());
    h
}

/// The signed grant assertion (RFC 7523 §2.1, Google's claim set).
pub fn grant_assertion(key: &SigningKey, c: &GrantClaimsInput<'_>) -> Result<Secret, SignError> {
    let claims = GrantClaims {
        iss: c.issuer,
        sub: c.subject,
        aud: c.audience,
        scope: c.scope.filter(|s| !s.is_empty()),
        iat: c.now,
        exp: c.now + GRANT_LIFETIME_SECS,
    };
    jsonwebtoken::encode(&header(key), &claims, &key.key)
        .map(Secret::new)
        .map_err(|e| SignError(e.to_string()))
}

/// The signed client assertion (RFC 7523 §2.2, OpenID Connect Core §9):
/// `iss` = `sub` = the client id, `aud` = the token endpoint, a `jti`
/// never used before.
pub fn client_assertion(
    key: &SigningKey,
    client_id: &str,
    token_url: &str,
    now: i64,
) -> Result<Secret, SignError> {
    let jti_bytes: [u8; 18] = rand::random();
    let jti = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jti_bytes);
    let claims = ClientClaims {
        iss: client_id,
        sub: client_id,
        aud: token_url,
        jti: &jti,
        iat: now,
        exp: now + CLIENT_ASSERTION_LIFETIME_SECS,
    };
    jsonwebtoken::encode(&header(key), &claims, &key.key)
        .map(Secret::new)
        .map_err(|e| SignError(e.to_string()))
}
