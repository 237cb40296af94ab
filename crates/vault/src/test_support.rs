//! What the vault's unit tests share.

use std::path::{Path, PathBuf};

use crate::{Credential, KeyRing, MasterKey};
use sidekey_base::secret::Secret;

pub(crate) fn ring(b: u8) -> KeyRing {
    KeyRing::new(MasterKey::from_bytes(&[b; 32]), vec![])
}

pub(crate) fn cred(tok: &str) -> Credential {
    Credential {
        access_token: Some(Secret::new(tok)),
        refresh_token: Some(Secret::new(format!("{tok}-refresh"))),
        expires_at: Some(2_000_000_000),
        ..Default::default()
    }
}

pub(crate) fn read_all(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in walk(p) {
        out.extend(std::fs::read(e).unwrap_or_default());
    }
    out
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap().path();
        if e.is_dir() {
            v.extend(walk(&e));
        } else {
            v.push(e);
        }
    }
    v
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
