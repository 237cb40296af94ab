//! JWT bearer tokens through the refresh machinery: cached per (provider,
//! subject) under [`sidekey_vault::Owner::Subject`], exchanged under the
//! same per-process single flight and cluster-wide claim as a refresh, so
//! any number of callers on any number of replicas make one exchange.
//!
//! A refusal (`invalid_grant`, `unauthorized_client`) is stored too, for
//! [`REFUSAL_HOLD_SECS`]: a storm of calls for a subject the organisation
//! has not allowed makes one token call, and an administrator who fixes
//! the delegation sees it work within that time.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Forced, RefreshCoordinator, RefreshError, TokenError, TokenGrant};
use crate::jwt::assertion::{GrantClaimsInput, JWT_BEARER_GRANT, grant_assertion};
use crate::jwt::{SubjectError, SubjectGrant};
use crate::providers::Provider;
use sidekey_vault::{Claim, Confirmed, Credential, Fenced, Owner};

/// How long a refused grant is answered from the store without a new
/// token call, seconds.
pub const REFUSAL_HOLD_SECS: i64 = 30;

pub(super) fn refused(p: &Provider, g: &SubjectGrant) -> RefreshError {
    RefreshError::GrantRefused(p.label(), g.subject.clone())
}

impl RefreshCoordinator {
    /// The subject's token, exchanged first when there is none, it is due,
    /// or it was got with a key no longer in force.
    pub async fn usable_for(
        &self,
        p: &Provider,
        g: &SubjectGrant,
    ) -> Result<Arc<Credential>, RefreshError> {
        let cur = self.store.credential(&g.owner, &p.name).await?;
        if let Some(c) = &cur {
            if g.fits(c) {
                if c.reauth_required {
                    if self.refusal_fresh(c) {
                        return Err(refused(p, g));
                    }
                } else if !self.needs_refresh(p, &g.owner, c) {
                    return Ok(c.clone());
                }
            }
        }
        let seen = cur.as_ref().map(|c| c.generation);
        match self.refresh_for(p, &g.owner, seen, false, Some(g)).await {
            // Exchanging early failed but the token still works: use it.
            Err(RefreshError::Failed(l)) => match cur {
                Some(c) if g.fits(&c) && !c.reauth_required && !self.expired(&c) => Ok(c),
                _ => Err(RefreshError::Failed(l)),
            },
            r => r,
        }
    }

    /// The refresh tool for a JWT bearer provider: a new exchange unless
    /// one happened within the cooldown.
    pub async fn force_for(&self, p: &Provider, g: &SubjectGrant) -> Result<Forced, RefreshError> {
        let cur = self.store.credential_uncached(&g.owner, &p.name).await?;
        if let Some(c) = &cur {
            if g.fits(c)
                && !c.reauth_required
                && !self.expired(c)
                && self.cooling_down(p, &g.owner, c)
            {
                self.metrics.refresh(&p.name, "cooldown");
                return Ok(Forced::Active(Arc::new(c.clone())));
            }
        }
        let seen = cur.map(|c| c.generation);
        self.refresh_for(p, &g.owner, seen, true, Some(g))
            .await
            .map(Forced::Refreshed)
    }

    /// After an upstream refused the subject token of generation `seen`:
    /// exchange again, with the subject and key the token record names.
    pub(super) async fn after_reject_subject(
        &self,
        p: &Provider,
        owner: &Owner,
        seen: u64,
    ) -> Result<Option<Arc<Credential>>, RefreshError> {
        let Some(c) = self.store.credential_uncached(owner, &p.name).await? else {
            return Ok(None);
        };
        if c.generation != seen && !c.reauth_required {
            return Ok(Some(Arc::new(c)));
        }
        let Some(info) = &c.jwt else {
            return Ok(None);
        };
        let g = crate::jwt::grant_from_record(&self.store, p, info)
            .await
            .map_err(|e| match e {
                SubjectError::Store(e) => RefreshError::Store(e),
                _ => RefreshError::CredentialMissing(p.label()),
            })?;
        self.refresh_for(p, owner, Some(seen), true, Some(&g))
            .await
            .map(Some)
    }

    pub(super) fn refusal_fresh(&self, c: &Credential) -> bool {
        c.refreshed_at
            .is_some_and(|t| self.clock.now() < t.saturating_add(REFUSAL_HOLD_SECS))
    }

    /// Under the claim: sign a new grant assertion and exchange it.
    pub(super) async fn exchange_assertion(
        &self,
        claim: &Claim,
        p: &Provider,
        g: &SubjectGrant,
    ) -> Result<TokenGrant, TokenError> {
        let none = BTreeMap::new();
        let s = p
            .jwt
            .as_deref()
            .ok_or_else(|| TokenError::BadClient("no JWT settings".into()))?;
        let key = g
            .signing_key(s)
            .map_err(|e| TokenError::BadClient(format!("the signing key {e}")))?;
        let url = p
            .token_url_for(&none)?
            .ok_or_else(|| TokenError::Transient("provider has no token_url".into()))?;
        let audience = s.audience.clone().unwrap_or_else(|| url.to_string());
        let issuer = key
            .issuer
            .clone()
            .or_else(|| p.client_id.clone())
            .unwrap_or_default();
        let scope = s.scope_claim.then(|| p.scopes.join(" "));
        let assertion = grant_assertion(
            &key,
            &GrantClaimsInput {
                issuer: &issuer,
                subject: &g.subject,
                audience: &audience,
                scope: scope.as_deref(),
                now: self.clock.now(),
            },
        )
        .map_err(|e| TokenError::BadClient(e.to_string()))?;
        let params = [
            ("grant_type", JWT_BEARER_GRANT),
            ("assertion", assertion.expose()),
        ];
        match self.token_call_renewing(claim, p, &params, &none).await {
            // Google answers `unauthorized_client` when the service
            // account has no domain-wide delegation for these scopes: the
            // organisation's decision, not a broken sidekey setting.
            Err(TokenError::BadClient(code)) if code == "unauthorized_client" => {
                Err(TokenError::Refused(code))
            }
            r => r,
        }
    }

    /// Under the claim: the token endpoint refused the grant. The refusal
    /// is stored (sealed, like a token) so that waiters here and on other
    /// replicas answer it without another call.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn refused_claimed(
        &self,
        claim: &Claim,
        p: &Provider,
        owner: &Owner,
        base: &Confirmed,
        g: &SubjectGrant,
        code: String,
        now: i64,
    ) -> Result<Arc<Credential>, RefreshError> {
        let mut c = Credential {
            reauth_required: true,
            reauth_reason: Some(code.clone()),
            refreshed_at: Some(now),
            updated_at: now,
            generation: base.credential.as_ref().map_or(0, |c| c.generation),
            jwt: Some(g.record()),
            ..Default::default()
        };
        let done = self.commit(claim, p, owner, base, &mut c).await?;
        if done == Fenced::Lost {
            return Err(self.lost(p, owner));
        }
        self.store.flush().await?;
        self.release_claim(claim, None).await;
        self.metrics.refresh(&p.name, "grant_refused");
        tracing::warn!(
            provider = %p.name,
            owner = %owner.describe(),
            error = %code,
            "JWT bearer grant refused by the token endpoint"
        );
        Err(refused(p, g))
    }
}
