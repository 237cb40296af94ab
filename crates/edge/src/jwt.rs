//! The request path's side of JWT bearer providers: the caller's grant
//! (subject and key) and its cached token, and the sentences for what can
//! go wrong. The signing and the exchange are the creds layer's.

use std::sync::Arc;

use sidekey_creds::jwt::{SubjectError, SubjectGrant};
use sidekey_creds::providers::Provider;
use sidekey_creds::refresh::Forced;
use sidekey_vault::{Credential, Owner};

use crate::app::App;
use crate::error::ApiError;

/// The subject a response's token was got for, carried to the audit
/// record on the response's extensions.
#[derive(Clone, Debug)]
pub(crate) struct AuditSubject(pub(crate) String);

/// The caller's grant for `cp` (a JWT bearer provider).
pub(crate) async fn grant(app: &App, cp: &Provider, user: &str) -> Result<SubjectGrant, ApiError> {
    sidekey_creds::jwt::subject_grant(&app.store, cp, user)
        .await
        .map_err(|e| match e {
            SubjectError::NoEmail | SubjectError::NoKey => ApiError::CredentialMissing(cp.label()),
            SubjectError::NotAllowed(s) => ApiError::SubjectNotAllowed(cp.label(), s),
            SubjectError::Store(e) => ApiError::Store(e),
        })
}

/// Phase 5 for a JWT bearer provider: the subject's cached token, or a new
/// exchange.
pub(crate) async fn credential(
    app: &App,
    cp: &Provider,
    user: &str,
) -> Result<(Owner, Arc<Credential>), ApiError> {
    let g = grant(app, cp, user).await?;
    let c = app.refresher.usable_for(cp, &g).await?;
    Ok((g.owner, c))
}

/// The refresh tool for a JWT bearer provider.
pub(crate) async fn force(app: &App, cp: &Provider, user: &str) -> Result<Forced, ApiError> {
    let g = grant(app, cp, user).await?;
    Ok(app.refresher.force_for(cp, &g).await?)
}
