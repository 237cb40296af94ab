//! JWT bearer grants (RFC 7523 §2.1: a service account signs "act for this
//! subject" and gets that subject's token, with no consent screen) and
//! `private_key_jwt` client authentication (§2.2: a signed assertion
//! instead of a client secret on every token request).
//!
//! - [`keys`]: reading and checking signing keys (PEM, service-account JSON);
//! - [`assertion`]: the two assertions, signed;
//! - [`settings`]: a provider's `jwt_*` keys resolved at start;
//! - [`subject`]: whose token a call needs (the caller's address or id),
//!   and which key signs for it (the tenant's stored one, else the file's).
//!
//! Tokens are exchanged and cached per (provider, subject) by the refresh
//! coordinator (`refresh/jwt.rs`), under the same single flight and
//! cluster-wide claim as every refresh.

pub mod assertion;
pub mod keys;
pub mod settings;
pub mod subject;

pub use assertion::{CLIENT_ASSERTION_TYPE, JWT_BEARER_GRANT};
pub use keys::{JwtAlg, KeyError, ServiceAccount, SigningKey};
pub use settings::{JwtSettings, SubjectTemplate};
pub use subject::{SubjectError, SubjectGrant, grant_from_record, subject_grant};
