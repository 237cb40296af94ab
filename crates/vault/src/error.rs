//! The store's errors: a failed operation, and a store that cannot be opened.

use crate::crypto::CryptoError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O: {0}")]
    Io(String),
    #[error("store record {key}: {err}")]
    Crypto { key: String, err: CryptoError },
    #[error("store record {0} is not valid JSON")]
    Decode(String),
    /// The shared database cannot be reached (or did not answer in time):
    /// callers answer 503 `store_unavailable` and may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    WrongKey(String),
    #[error("{0}")]
    Locked(String),
    #[error("{0}")]
    Other(String),
}

impl OpenError {
    pub fn message(self) -> String {
        match self {
            OpenError::WrongKey(m) | OpenError::Locked(m) | OpenError::Other(m) => m,
        }
    }
}
