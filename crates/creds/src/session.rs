//! Session tokens: short-lived JWTs that let one conversation act for one
//! user on a chosen set of providers.
//!
//! A token alone is not enough: verification pins the algorithm to the one
//! its `kid` was created with, checks `iss`, `aud`, `exp` (no leeway), and
//! then requires the session record in the store, so deleting a session or
//! its user revokes the token at once.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use sidekey_base::clock::Clock;
use sidekey_base::secret::Secret;
use sidekey_vault::{SessionRecord, Store, StoreError};

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Why a session token was refused: sent as `reason` next to the code and
/// written to the access log. Coarse on purpose: it tells an integrator
/// what to fix (send the header, mint a new session, check the key)
/// without telling an attacker which check a forgery got past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionFault {
    /// No session token: no header, an empty one, or a misspelt name.
    Missing,
    /// Not a token sidekey issued: unparsable, oversized, no `kid`, wrong
    /// issuer or audience, or claims that do not hold together.
    Malformed,
    /// Past its `exp`, or an unbound session past `bind_within_secs`.
    Expired,
    /// The signature does not verify, or the algorithm is not the key's.
    BadSignature,
    /// Signed with a key sidekey does not know (rotated out, or another
    /// deployment's).
    UnknownKey,
    /// Its record is gone: revoked by the admin API, by post-call, by a
    /// conversation conflict, or the user was deleted.
    Revoked,
}

impl SessionFault {
    pub fn reason(self) -> &'static str {
        match self {
            SessionFault::Missing => "missing",
            SessionFault::Malformed => "malformed",
            SessionFault::Expired => "expired",
            SessionFault::BadSignature => "bad_signature",
            SessionFault::UnknownKey => "unknown_key",
            SessionFault::Revoked => "revoked",
        }
    }
}

/// Why a session was refused, or why it could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The fault is sent to the caller as `reason`; the detail is only logged.
    #[error("invalid session ({reason}): {detail}", reason = .0.reason(), detail = .1)]
    Invalid(SessionFault, &'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The JWT claims of a session token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionClaims {
    pub iss: String,
    pub aud: String,
    /// The user the session acts for.
    pub sub: String,
    /// Session id: the store record that makes the token valid.
    pub sid: String,
    pub providers: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<String>,
}

struct Verifier {
    alg: Algorithm,
    key: DecodingKey,
}

struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
}

/// Parsed signing material: the current key and every key that verifies.
pub struct SessionKeys {
    signer: Signer,
    verifiers: HashMap<String, Verifier>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("kid", &self.signer.kid)
            .field("alg", &self.signer.alg)
            .field("verifying_kids", &self.verifiers.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn short_hash(domain: &[u8], data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(data);
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses one key: an Ed25519 PKCS#8 PEM (EdDSA) or a base64 secret of at
/// least 32 bytes (HS256).
fn parse_key(text: &Secret) -> Result<(Signer, Verifier), String> {
    let t = text.expose().trim();
    if t.starts_with("-----BEGIN") {
        use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
        let der = PrivateKeyDer::from_pem_slice(t.as_bytes())
            .map_err(|_| "is a PEM file but not a readable private key".to_string())?;
        let PrivateKeyDer::Pkcs8(pk8) = der else {
            return Err(
                "must be an Ed25519 key in PKCS#8 PEM (`openssl genpkey -algorithm ed25519`)"
                    .into(),
            );
        };
        let pair =
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pk8.secret_pkcs8_der())
                .map_err(|_| {
                    "must be an Ed25519 key in PKCS#8 PEM (`openssl genpkey -algorithm ed25519`)"
                        .to_string()
                })?;
        use ring::signature::KeyPair;
        let public = pair.public_key().as_ref().to_vec();
        let kid = format!("ed-{}", short_hash(b"sidekey session kid v1\0", &public));
        Ok((
            Signer {
                kid,
                alg: Algorithm::EdDSA,
                key: EncodingKey::from_ed_der(pk8.secret_pkcs8_der()),
            },
            Verifier {
                alg: Algorithm::EdDSA,
                key: DecodingKey::from_ed_der(&public),
            },
        ))
    } else {
        let bytes = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(t))
                .map_err(|_| {
                    "is neither base64 (HS256 secret) nor an Ed25519 PEM key; generate one with `openssl rand -base64 32`".to_string()
                })?,
        );
        if bytes.len() < 32 {
            return Err(format!(
                "HS256 secret is {} bytes; use at least 32 random bytes (`openssl rand -base64 32`)",
                bytes.len()
            ));
        }
        let kid = format!("hs-{}", short_hash(b"sidekey session kid v1\0", &bytes));
        Ok((
            Signer {
                kid,
                alg: Algorithm::HS256,
                key: EncodingKey::from_secret(&bytes),
            },
            Verifier {
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(&bytes),
            },
        ))
    }
}

impl SessionKeys {
    /// `current` signs and verifies; `previous` only verify (rotation).
    pub fn new(current: &Secret, previous: &[Secret]) -> Result<SessionKeys, String> {
        let (signer, v) = parse_key(current)?;
        let mut verifiers = HashMap::new();
        verifiers.insert(signer.kid.clone(), v);
        for (i, p) in previous.iter().enumerate() {
            let (s, v) = parse_key(p).map_err(|e| format!("previous key #{}: {e}", i + 1))?;
            verifiers.entry(s.kid).or_insert(v);
        }
        Ok(SessionKeys { signer, verifiers })
    }

    pub fn kid(&self) -> &str {
        &self.signer.kid
    }

    pub fn algorithm(&self) -> Algorithm {
        self.signer.alg
    }

    /// A fresh HS256 secret, base64, for `generate_missing`.
    pub fn generate_hs256() -> Secret {
        let mut k = zeroize::Zeroizing::new([0u8; 32]);
        rand::fill(&mut k[..]);
        Secret::new(base64::engine::general_purpose::STANDARD.encode(&k[..]))
    }
}

/// A session that passed every check. It shares the verified claims and
/// the cached session record rather than copying their strings: this is
/// built for every proxied request.
#[derive(Clone, Debug)]
pub struct VerifiedSession {
    claims: Arc<SessionClaims>,
    record: Arc<sidekey_vault::SessionRecord>,
    /// The conversation this very call bound it to (the cached record
    /// predates the binding).
    bound_now: Option<String>,
}

impl VerifiedSession {
    pub fn sid(&self) -> &str {
        &self.claims.sid
    }

    pub fn user(&self) -> &str {
        &self.record.user
    }

    /// The providers it may use (the record's list is authoritative; the
    /// claim is informational).
    pub fn providers(&self) -> &[String] {
        &self.record.providers
    }

    /// When the session was minted (unix seconds).
    pub fn iat(&self) -> i64 {
        self.record.iat
    }

    pub fn conv(&self) -> Option<&str> {
        self.bound_now.as_deref().or(self.record.conv.as_deref())
    }

    /// Records that this call bound the session to `conv`.
    pub fn bound_to(&mut self, conv: &str) {
        self.bound_now = Some(conv.to_owned());
    }

    /// A session as `verify` would pass it, for unit tests elsewhere.
    #[cfg(test)]
    pub fn for_test(sid: &str, record: sidekey_vault::SessionRecord) -> VerifiedSession {
        VerifiedSession {
            claims: Arc::new(SessionClaims {
                iss: "sidekey".into(),
                aud: "sidekey".into(),
                sub: record.user.clone(),
                sid: sid.into(),
                providers: record.providers.clone(),
                iat: record.iat,
                exp: record.exp,
                conv: record.conv.clone(),
            }),
            record: Arc::new(record),
            bound_now: None,
        }
    }
}

/// A newly minted session.
#[derive(Debug)]
pub struct Minted {
    pub sid: String,
    pub token: Secret,
    pub exp: i64,
    pub claims: SessionClaims,
}

/// What sidekey accepts as a conversation id (ElevenLabs' `conv_…`, or
/// any printable ASCII a caller binds).
pub fn valid_conversation_id(c: &str) -> bool {
    !c.is_empty() && c.len() <= 256 && c.bytes().all(|b| b.is_ascii_graphic())
}

/// Mints and verifies session tokens against the store.
pub struct SessionAuthority {
    keys: SessionKeys,
    /// Claims of tokens whose signature already verified, by token.
    verified: sidekey_vault::Cache<SessionClaims>,
    issuer: String,
    audience: String,
    store: Arc<Store>,
    clock: Clock,
}

impl SessionAuthority {
    pub fn new(
        keys: SessionKeys,
        issuer: String,
        audience: String,
        store: Arc<Store>,
        clock: Clock,
    ) -> Self {
        SessionAuthority {
            keys,
            verified: sidekey_vault::Cache::new(std::time::Duration::from_secs(60), 10_000),
            issuer,
            audience,
            store,
            clock,
        }
    }

    pub fn keys(&self) -> &SessionKeys {
        &self.keys
    }

    /// Signs a token and writes its record (the caller flushes).
    pub async fn mint(
        &self,
        user: &str,
        providers: Vec<String>,
        ttl_secs: u64,
        conv: Option<String>,
    ) -> Result<Minted, StoreError> {
        let now = self.clock.now();
        let mut id = [0u8; 16];
        rand::fill(&mut id);
        let sid = format!(
            "ses_{}",
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        // Saturating: a huge configured TTL must not wrap into the past.
        let exp = now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX));
        let claims = SessionClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user.to_owned(),
            sid: sid.clone(),
            providers: providers.clone(),
            iat: now,
            exp,
            conv: conv.clone(),
        };
        let mut header = Header::new(self.keys.signer.alg);
        header.kid = Some(self.keys.signer.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.keys.signer.key)
            .expect("signing with a parsed key does not fail");
        self.store
            .put_session(
                &sid,
                &SessionRecord {
                    user: user.to_owned(),
                    providers,
                    iat: now,
                    exp,
                    conv,
                },
            )
            .await?;
        Ok(Minted {
            sid,
            token: Secret::new(token),
            exp,
            claims,
        })
    }

    /// Mints a session and answers as the admin API and conversation-init
    /// do: id, token, expiry and the dynamic variable that carries it.
    pub async fn mint_answer(
        &self,
        dynamic_variable: &str,
        user: &str,
        providers: Vec<String>,
        ttl_secs: u64,
        conversation_id: Option<String>,
    ) -> Result<serde_json::Value, SessionError> {
        let m = self
            .mint(user, providers.clone(), ttl_secs, conversation_id.clone())
            .await
            .map_err(SessionError::from)?;
        Ok(serde_json::json!({
            "session_id": m.sid,
            "token": m.token.expose(),
            "expires_at": m.exp,
            "user": user,
            "providers": providers,
            "conversation_id": conversation_id,
            "dynamic_variables": { dynamic_variable: m.token.expose() },
        }))
    }

    /// Checks signature, algorithm, claims and the store record.
    pub async fn verify(&self, token: &str) -> Result<VerifiedSession, SessionError> {
        if token.is_empty() {
            return Err(SessionError::Invalid(SessionFault::Missing, "empty token"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(SessionError::Invalid(
                SessionFault::Malformed,
                "token too large",
            ));
        }
        // A token that verified before is the same bytes under the same
        // keys: its signature need not be checked again. Expiry, the
        // session record and revocation are checked on every call below.
        let c = match self.verified.get(token) {
            Ok(c) => c,
            Err(epoch) => {
                let c = Arc::new(self.verify_signature(token)?);
                self.verified.insert(token, c.clone(), epoch);
                c
            }
        };
        let now = self.clock.now();
        // The library checks exp against the system clock; check against
        // ours too (the same clock every other expiry in sidekey uses).
        if c.exp <= now {
            return Err(SessionError::Invalid(
                SessionFault::Expired,
                "token expired",
            ));
        }
        if c.iat > now.saturating_add(60) {
            return Err(SessionError::Invalid(
                SessionFault::Malformed,
                "token issued in the future",
            ));
        }
        let rec = match self.store.session(&c.sid).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(SessionError::Invalid(
                    SessionFault::Revoked,
                    "session revoked or unknown",
                ));
            }
            Err(e) => return Err(SessionError::from(e)),
        };
        if rec.user != c.sub {
            return Err(SessionError::Invalid(
                SessionFault::Revoked,
                "session record does not match token",
            ));
        }
        if rec.exp <= now {
            return Err(SessionError::Invalid(
                SessionFault::Expired,
                "token expired",
            ));
        }
        if let Some(conv) = &c.conv {
            if rec.conv.as_deref() != Some(conv) {
                return Err(SessionError::Invalid(
                    SessionFault::Revoked,
                    "session record does not match token",
                ));
            }
        }
        Ok(VerifiedSession {
            claims: c,
            record: rec,
            bound_now: None,
        })
    }

    /// Header, `kid`, pinned algorithm, signature, `iss`, `aud`, `exp`, `nbf`.
    fn verify_signature(&self, token: &str) -> Result<SessionClaims, SessionError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| SessionError::Invalid(SessionFault::Malformed, "malformed token"))?;
        let kid = header.kid.as_deref().ok_or(SessionError::Invalid(
            SessionFault::Malformed,
            "token has no kid",
        ))?;
        let v = self.keys.verifiers.get(kid).ok_or(SessionError::Invalid(
            SessionFault::UnknownKey,
            "unknown kid",
        ))?;
        // The algorithm comes from our key, never from the token: this is
        // what defeats `alg: none` and HS256-with-a-public-key confusion.
        if header.alg != v.alg {
            return Err(SessionError::Invalid(
                SessionFault::BadSignature,
                "algorithm not allowed",
            ));
        }
        let mut val = Validation::new(v.alg);
        val.leeway = 0;
        val.validate_nbf = true;
        val.set_issuer(&[&self.issuer]);
        val.set_audience(&[&self.audience]);
        val.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<SessionClaims>(token, &v.key, &val).map_err(|e| {
            use SessionFault as F;
            use jsonwebtoken::errors::ErrorKind::*;
            let (fault, detail) = match e.kind() {
                ExpiredSignature => (F::Expired, "token expired"),
                ImmatureSignature => (F::Malformed, "token not yet valid"),
                InvalidIssuer => (F::Malformed, "wrong issuer"),
                InvalidAudience => (F::Malformed, "wrong audience"),
                InvalidSignature => (F::BadSignature, "bad signature"),
                InvalidAlgorithm => (F::BadSignature, "algorithm not allowed"),
                _ => (F::Malformed, "token rejected"),
            };
            SessionError::Invalid(fault, detail)
        })?;
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidekey_vault::{KeyRing, MasterKey, StoreOptions};

    fn authority(dir: &std::path::Path, key: &Secret) -> SessionAuthority {
        let store = Store::open(
            &dir.join("db"),
            KeyRing::new(MasterKey::from_bytes(&[7; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        SessionAuthority::new(
            SessionKeys::new(key, &[]).unwrap(),
            "sidekey".into(),
            "sidekey-proxy".into(),
            Arc::new(store),
            Clock::system(),
        )
    }

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[tokio::test]
    async fn mint_verify_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let a = authority(dir.path(), &SessionKeys::generate_hs256());
        let m = a
            .mint("alice", vec!["slack".into()], 60, None)
            .await
            .unwrap();
        let v = a.verify(m.token.expose()).await.unwrap();
        assert_eq!(v.user(), "alice");
        assert_eq!(v.providers(), ["slack"]);
        let header = jsonwebtoken::decode_header(m.token.expose()).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
        assert!(header.kid.unwrap().starts_with("hs-"));
        a.store.revoke_session(&m.sid).await.unwrap();
        assert!(matches!(
            a.verify(m.token.expose()).await,
            Err(SessionError::Invalid(
                SessionFault::Revoked,
                "session revoked or unknown"
            ))
        ));
    }

    #[tokio::test]
    async fn alg_none_and_tampering_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = authority(dir.path(), &SessionKeys::generate_hs256());
        let m = a
            .mint("alice", vec!["slack".into()], 60, None)
            .await
            .unwrap();
        let parts: Vec<&str> = m.token.expose().split('.').collect();
        let kid = a.keys.kid().to_owned();
        let none_header = b64(format!(r#"{{"alg":"none","kid":"{kid}"}}"#).as_bytes());
        let forged = format!("{none_header}.{}.", parts[1]);
        assert!(a.verify(&forged).await.is_err());
        let mut claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[1])
                .unwrap(),
        )
        .unwrap();
        claims["sub"] = "mallory".into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(claims.to_string().as_bytes()),
            parts[2]
        );
        assert!(a.verify(&tampered).await.is_err());
        assert!(a.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)).await.is_err());
        assert!(a.verify("not.a.jwt").await.is_err());
    }

    #[tokio::test]
    async fn other_key_and_previous_keys() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = SessionKeys::generate_hs256();
        let k2 = SessionKeys::generate_hs256();
        let a = authority(dir.path(), &k1);
        let m = a.mint("alice", vec![], 60, None).await.unwrap();
        // A verifier with only k2 refuses; with k1 as previous it accepts.
        let b = SessionAuthority::new(
            SessionKeys::new(&k2, &[]).unwrap(),
            "sidekey".into(),
            "sidekey-proxy".into(),
            a.store.clone(),
            Clock::system(),
        );
        assert!(b.verify(m.token.expose()).await.is_err());
        let c = SessionAuthority::new(
            SessionKeys::new(&k2, std::slice::from_ref(&k1)).unwrap(),
            "sidekey".into(),
            "sidekey-proxy".into(),
            a.store.clone(),
            Clock::system(),
        );
        assert!(c.verify(m.token.expose()).await.is_ok());
    }

    #[tokio::test]
    async fn expiry_follows_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let a = authority(dir.path(), &SessionKeys::generate_hs256());
        let m = a.mint("alice", vec![], 30, None).await.unwrap();
        assert!(a.verify(m.token.expose()).await.is_ok());
        a.clock.advance(31);
        assert!(matches!(
            a.verify(m.token.expose()).await,
            Err(SessionError::Invalid(
                SessionFault::Expired,
                "token expired"
            ))
        ));
    }

    #[tokio::test]
    async fn eddsa_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let pem = Secret::new(pair.serialize_pem());
        let a = authority(dir.path(), &pem);
        assert_eq!(a.keys.algorithm(), Algorithm::EdDSA);
        let m = a.mint("alice", vec![], 60, None).await.unwrap();
        assert!(a.verify(m.token.expose()).await.is_ok());
        assert_eq!(
            jsonwebtoken::decode_header(m.token.expose()).unwrap().alg,
            Algorithm::EdDSA
        );
    }

    #[tokio::test]
    async fn short_hs_secret_refused() {
        let e = SessionKeys::new(&Secret::new("c2hvcnQ="), &[]).unwrap_err();
        assert!(e.contains("at least 32"), "{e}");
    }
}
