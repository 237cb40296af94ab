//! Sealing records: XChaCha20-Poly1305 under the master key.
//!
//! A sealed record is `[version=1][key id: 8][nonce: 24][ciphertext+tag]`.
//! The nonce is random (XChaCha's 192 bits make collisions a non-issue), and
//! the associated data binds the header and the record's tree and key, so a
//! ciphertext moved to another record or another tree does not open.

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use sidekey_base::secret::Secret;

const VERSION: u8 = 1;
const HEADER: usize = 1 + 8 + 24;

/// First 8 bytes of a domain-separated SHA-256 of the key: names a key
/// without revealing it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

pub struct MasterKey {
    id: KeyId,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id.hex())
    }
}

impl MasterKey {
    /// Parses 32 bytes given as base64 (standard or URL-safe, padded or not)
    /// or 64 hex digits.
    pub fn parse(text: &Secret) -> Result<MasterKey, String> {
        let t = text.expose().trim();
        let bytes: Zeroizing<Vec<u8>> = Zeroizing::new(
            if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
                (0..32)
                    .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap_or(0))
                    .collect()
            } else {
                let engines = [
                    &base64::engine::general_purpose::STANDARD,
                    &base64::engine::general_purpose::STANDARD_NO_PAD,
                    &base64::engine::general_purpose::URL_SAFE,
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ];
                engines
                    .iter()
                    .find_map(|e| e.decode(t).ok())
                    .ok_or("is not base64 (generate one with `openssl rand -base64 32`)")?
            },
        );
        if bytes.len() != 32 {
            return Err(format!(
                "must hold exactly 32 bytes, base64-encoded, but holds {} (generate one with `openssl rand -base64 32`)",
                bytes.len()
            ));
        }
        Ok(MasterKey::from_bytes(&bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> MasterKey {
        let mut h = Sha256::new();
        h.update(b"sidekey master key id v1\0");
        h.update(bytes);
        let d = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        MasterKey {
            id: KeyId(id),
            cipher: XChaCha20Poly1305::new_from_slice(bytes).expect("32-byte key"),
        }
    }

    /// A fresh random key, base64-encoded, for `generate_missing`.
    pub fn generate_base64() -> Secret {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::fill(&mut k[..]);
        Secret::new(base64::engine::general_purpose::STANDARD.encode(&k[..]))
    }

    pub fn id(&self) -> KeyId {
        self.id
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("record is sealed under key {0}, which is not configured")]
    UnknownKey(String),
    #[error("record failed authentication (wrong key, or tampered)")]
    Tampered,
    #[error("record is not in a known format")]
    Format,
}

/// The current master key and older ones that still open records.
#[derive(Debug)]
pub struct KeyRing {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

/// A decrypted record and whether it should be re-sealed under the current key.
pub struct Opened {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub stale: bool,
}

impl KeyRing {
    pub fn new(current: MasterKey, previous: Vec<MasterKey>) -> KeyRing {
        KeyRing { current, previous }
    }

    pub fn current_id(&self) -> KeyId {
        self.current.id
    }

    pub fn knows(&self, id: KeyId) -> bool {
        self.current.id == id || self.previous.iter().any(|k| k.id == id)
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut header = [0u8; HEADER];
        header[0] = VERSION;
        header[1..9].copy_from_slice(&self.current.id.0);
        header[9..].copy_from_slice(&nonce);
        let full_aad = [&header[..], aad].concat();
        let ct = self
            .current
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &full_aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption does not fail for in-memory buffers");
        let mut out = Vec::with_capacity(HEADER + ct.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&ct);
        out
    }

    pub fn record_key_id(record: &[u8]) -> Option<KeyId> {
        if record.len() < HEADER || record[0] != VERSION {
            return None;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&record[1..9]);
        Some(KeyId(id))
    }

    pub fn open(&self, aad: &[u8], record: &[u8]) -> Result<Opened, CryptoError> {
        let id = KeyRing::record_key_id(record).ok_or(CryptoError::Format)?;
        let (key, stale) = if id == self.current.id {
            (&self.current, false)
        } else {
            (
                self.previous
                    .iter()
                    .find(|k| k.id == id)
                    .ok_or_else(|| CryptoError::UnknownKey(id.hex()))?,
                true,
            )
        };
        let full_aad = [&record[..HEADER], aad].concat();
        let nonce = XNonce::from_slice(&record[9..HEADER]);
        let pt = key
            .cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &record[HEADER..],
                    aad: &full_aad,
                },
            )
            .map_err(|_| CryptoError::Tampered)?;
        Ok(Opened {
            plaintext: Zeroizing::new(pt),
            stale,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> MasterKey {
        MasterKey::from_bytes(&[b; 32])
    }

    #[test]
    fn round_trip_and_random_nonces() {
        let ring = KeyRing::new(key(1), vec![]);
        let a = ring.seal(b"credentials/u/alice/slack", b"hello");
        let b = ring.seal(b"credentials/u/alice/slack", b"hello");
        assert_ne!(a, b, "nonces must differ");
        assert!(!a.windows(5).any(|w| w == b"hello"));
        let o = ring.open(b"credentials/u/alice/slack", &a).unwrap();
        assert_eq!(&o.plaintext[..], b"hello");
        assert!(!o.stale);
    }

    #[test]
    fn record_key_is_bound() {
        let ring = KeyRing::new(key(1), vec![]);
        let a = ring.seal(b"credentials/u/alice/slack", b"hello");
        assert_eq!(
            ring.open(b"credentials/u/mallory/slack", &a).err(),
            Some(CryptoError::Tampered)
        );
    }

    #[test]
    fn tamper_and_wrong_key_fail() {
        let ring = KeyRing::new(key(1), vec![]);
        let mut a = ring.seal(b"k", b"hello");
        let last = a.len() - 1;
        a[last] ^= 1;
        assert_eq!(ring.open(b"k", &a).err(), Some(CryptoError::Tampered));
        let a = ring.seal(b"k", b"hello");
        let other = KeyRing::new(key(2), vec![]);
        assert!(matches!(
            other.open(b"k", &a),
            Err(CryptoError::UnknownKey(_))
        ));
        assert_eq!(other.open(b"k", b"short").err(), Some(CryptoError::Format));
    }

    #[test]
    fn previous_keys_open_and_mark_stale() {
        let old = KeyRing::new(key(1), vec![]);
        let a = old.seal(b"k", b"v");
        let new = KeyRing::new(key(2), vec![key(1)]);
        let o = new.open(b"k", &a).unwrap();
        assert!(o.stale);
        assert_eq!(&o.plaintext[..], b"v");
    }

    #[test]
    fn parse_key_formats() {
        let b64 = MasterKey::generate_base64();
        assert!(MasterKey::parse(&b64).is_ok());
        let hex = Secret::new("00".repeat(32));
        assert!(MasterKey::parse(&hex).is_ok());
        let short = Secret::new("c2hvcnQ=");
        let e = MasterKey::parse(&short).unwrap_err();
        assert!(e.contains("32 bytes"), "{e}");
        assert!(MasterKey::parse(&Secret::new("not base64!!")).is_err());
    }
}
