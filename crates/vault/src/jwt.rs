//! Record formats of JWT bearer grants: a tenant's signing key, and what a
//! token got by such a grant remembers of how it was got. Both live inside
//! a sealed [`crate::Credential`], like every other secret of the store.

use serde::{Deserialize, Serialize};

use sidekey_base::secret::Secret;

/// A tenant's own signing key for a `jwt_bearer` provider (admin
/// `PUT /v1/tenants/{t}/credentials/{p}` with `service_account` or
/// `jwt_key`). The admin API shows `key_id` and `issuer`, never the key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JwtKey {
    /// `service_account` or `jwt_key`: which body it came from.
    pub kind: String,
    /// `iss` of the assertions (a service account's `client_email`).
    pub issuer: String,
    pub private_key_pem: Secret,
    /// Header `kid` (a service account's `private_key_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Names this key without revealing it: tokens signed for with another
    /// key are not used once this one replaces it.
    pub fingerprint: String,
}

/// On a token sidekey got by a JWT bearer exchange: for whom, and with
/// which key. A token whose key is no longer the one in force is exchanged
/// again; a later exchange (after an upstream 401) needs nothing else.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JwtGrant {
    /// The assertion's `sub` (an e-mail address or a user id).
    pub subject: String,
    /// The tenant whose stored key signed; `None`: the configured key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// [`JwtKey::fingerprint`] of the signing key (or the configured key's).
    pub fingerprint: String,
}
