//! Signing keys for JWT assertions: PEM private keys (PKCS#1, PKCS#8,
//! SEC1) and Google service-account JSON, checked once when they are read
//! (file keys at start, tenant keys at the admin PUT) so that a key that
//! cannot sign is refused with a sentence naming its field, never found
//! out at the first token call.

use std::fmt;

use jsonwebtoken::{Algorithm, EncodingKey};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rsa::traits::PublicKeyParts;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use sidekey_base::secret::Secret;

/// The smallest RSA modulus accepted, in bits (RFC 7518 §3.3 asks for at
/// least 2048; providers refuse less).
pub const MIN_RSA_BITS: usize = 2048;

/// The algorithms assertions are signed with (`jwt_alg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtAlg {
    Rs256,
    Es256,
    Ps256,
}

impl JwtAlg {
    pub fn parse(s: &str) -> Option<JwtAlg> {
        match s {
            "RS256" => Some(JwtAlg::Rs256),
            "ES256" => Some(JwtAlg::Es256),
            "PS256" => Some(JwtAlg::Ps256),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JwtAlg::Rs256 => "RS256",
            JwtAlg::Es256 => "ES256",
            JwtAlg::Ps256 => "PS256",
        }
    }

    pub(super) fn algorithm(self) -> Algorithm {
        match self {
            JwtAlg::Rs256 => Algorithm::RS256,
            JwtAlg::Es256 => Algorithm::ES256,
            JwtAlg::Ps256 => Algorithm::PS256,
        }
    }

    fn wants_rsa(self) -> bool {
        self != JwtAlg::Es256
    }
}

/// Why a key cannot sign. Never quotes the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "is not a PEM private key (it should start with -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)"
    )]
    NotPem,
    #[error("is a {0}, not a private key; give the private key that signs the assertions")]
    NotPrivate(String),
    #[error("is encrypted; give the key without a passphrase (openssl pkcs8 -topk8 -nocrypt)")]
    Encrypted,
    #[error("is an RSA key of {0} bits; use one of at least 2048 bits")]
    TooSmall(usize),
    #[error("is {found} key, but jwt_alg = {alg} needs {needs}")]
    WrongKind {
        alg: &'static str,
        found: &'static str,
        needs: &'static str,
    },
    #[error("cannot be read as a private key ({0})")]
    Unreadable(String),
    #[error("{0}")]
    ServiceAccount(String),
}

/// A key ready to sign, with what the assertions say about it.
pub struct SigningKey {
    pub alg: JwtAlg,
    pub(super) key: EncodingKey,
    /// Header `kid`.
    pub key_id: Option<String>,
    /// `iss` when the key names one (a service account, a tenant key).
    pub issuer: Option<String>,
    /// Names the key without revealing it (stored with the tokens it got).
    pub fingerprint: String,
}

// The key itself never prints.
impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("key_id", &self.key_id)
            .field("issuer", &self.issuer)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl SigningKey {
    /// Reads a PEM private key for `alg`.
    pub fn from_pem(
        pem: &str,
        alg: JwtAlg,
        key_id: Option<String>,
        issuer: Option<String>,
    ) -> Result<SigningKey, KeyError> {
        let (label, block) = private_block(pem)?;
        let (key, der_hash, found) = match label.as_str() {
            "RSA PRIVATE KEY" => rsa_key(
                rsa::RsaPrivateKey::from_pkcs1_pem(&block)
                    .map_err(|e| KeyError::Unreadable(e.to_string()))?,
            )?,
            "PRIVATE KEY" => {
                match rsa::RsaPrivateKey::from_pkcs8_pem(&block) {
                    Ok(k) => rsa_key(k)?,
                    Err(_) => ec_key(p256::SecretKey::from_pkcs8_pem(&block).map_err(|_| {
                        KeyError::Unreadable("neither an RSA nor a P-256 key".into())
                    })?)?,
                }
            }
            "EC PRIVATE KEY" => ec_key(
                p256::SecretKey::from_sec1_pem(&block)
                    .map_err(|_| KeyError::Unreadable("not a P-256 (prime256v1) key".into()))?,
            )?,
            _ => unreachable!("private_block answers private-key labels only"),
        };
        if alg.wants_rsa() != (found == "an RSA") {
            return Err(KeyError::WrongKind {
                alg: alg.name(),
                found,
                needs: if alg.wants_rsa() {
                    "an RSA key"
                } else {
                    "a P-256 EC key"
                },
            });
        }
        let mut h = Sha256::new();
        h.update(alg.name());
        h.update([0]);
        h.update(issuer.as_deref().unwrap_or(""));
        h.update([0]);
        h.update(key_id.as_deref().unwrap_or(""));
        h.update([0]);
        h.update(der_hash);
        let fingerprint = h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(SigningKey {
            alg,
            key,
            key_id,
            issuer,
            fingerprint,
        })
    }

    /// Reads a Google service-account JSON key as Google's client
    /// libraries do: `client_email` is the issuer, `private_key_id` the
    /// `kid`, `private_key` the RSA key, `token_uri` the token endpoint.
    pub fn from_service_account(
        json: &str,
        alg: JwtAlg,
    ) -> Result<(SigningKey, ServiceAccount), KeyError> {
        let sa = ServiceAccount::parse(json)?;
        let key = SigningKey::from_pem(
            sa.private_key.expose(),
            alg,
            sa.private_key_id.clone(),
            Some(sa.client_email.clone()),
        )
        .map_err(|e| KeyError::ServiceAccount(format!("private_key {e}")))?;
        Ok((key, sa))
    }
}

/// The fields of a service-account key file sidekey reads.
#[derive(Deserialize)]
pub struct ServiceAccount {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub client_email: String,
    pub private_key: Secret,
    #[serde(default)]
    pub private_key_id: Option<String>,
    #[serde(default)]
    pub token_uri: Option<String>,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    pub fn parse(json: &str) -> Result<ServiceAccount, KeyError> {
        let sa: ServiceAccount = serde_json::from_str(json).map_err(|e| {
            // serde's message names a missing field but never quotes values.
            let m = e.to_string();
            let m = m.split(" at line").next().unwrap_or("").replace('`', "");
            KeyError::ServiceAccount(if e.is_syntax() || e.is_eof() {
                "is not valid JSON".into()
            } else {
                format!("is not a service-account key: {m}")
            })
        })?;
        if let Some(k) = &sa.kind {
            if k != "service_account" {
                return Err(KeyError::ServiceAccount(format!(
                    "has type {:?}; a service-account key has type \"service_account\"",
                    k.chars().take(40).collect::<String>()
                )));
            }
        }
        if sidekey_base::users::normalize_email(&sa.client_email).is_none() {
            return Err(KeyError::ServiceAccount(
                "client_email is not an e-mail address".into(),
            ));
        }
        Ok(sa)
    }
}

/// The first private-key block of a PEM text: its label and the block.
/// A certificate or public key is named, so the operator knows what they
/// gave instead.
fn private_block(pem: &str) -> Result<(String, String), KeyError> {
    let mut other = None;
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let Some(end_label) = after.find("-----") else {
            break;
        };
        let label = after[..end_label].to_owned();
        let end_marker = format!("-----END {label}-----");
        let Some(end) = after.find(&end_marker) else {
            break;
        };
        let block = format!("-----BEGIN {}{}", &after[..end], end_marker);
        match label.as_str() {
            "RSA PRIVATE KEY" | "PRIVATE KEY" | "EC PRIVATE KEY" => return Ok((label, block)),
            "ENCRYPTED PRIVATE KEY" => return Err(KeyError::Encrypted),
            _ => other = other.or(Some(label)),
        }
        rest = &after[end + end_marker.len()..];
    }
    match other {
        Some(l) => Err(KeyError::NotPrivate(describe_label(&l))),
        None => Err(KeyError::NotPem),
    }
}

fn describe_label(l: &str) -> String {
    match l {
        "CERTIFICATE" => "certificate".into(),
        "PUBLIC KEY" | "RSA PUBLIC KEY" => "public key".into(),
        other => format!("PEM block {:?}", other.chars().take(40).collect::<String>()),
    }
}

type Parsed = (EncodingKey, [u8; 32], &'static str);

fn rsa_key(k: rsa::RsaPrivateKey) -> Result<Parsed, KeyError> {
    let bits = k.size() * 8;
    if bits < MIN_RSA_BITS {
        return Err(KeyError::TooSmall(bits));
    }
    let der = k
        .to_pkcs1_der()
        .map_err(|e| KeyError::Unreadable(e.to_string()))?;
    Ok((
        EncodingKey::from_rsa_der(der.as_bytes()),
        Sha256::digest(der.as_bytes()).into(),
        "an RSA",
    ))
}

fn ec_key(k: p256::SecretKey) -> Result<Parsed, KeyError> {
    let der = k
        .to_pkcs8_der()
        .map_err(|e| KeyError::Unreadable(e.to_string()))?;
    Ok((
        EncodingKey::from_ec_der(der.as_bytes()),
        Sha256::digest(der.as_bytes()).into(),
        "a P-256 EC",
    ))
}
