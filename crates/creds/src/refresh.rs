//! Keeping access tokens usable: refresh before expiry, after a 401, or on
//! demand, with exactly one token-endpoint call per credential at a time.
//!
//! Rules that keep users logged in:
//! - single flight: callers needing the same credential refreshed queue on
//!   one lock; whoever gets it second sees the new generation and uses it;
//! - a rotated refresh token is written and flushed before anyone uses the
//!   new access token;
//! - a refused refresh token (`invalid_grant` or the preset's equivalent)
//!   marks the credential `reauth_required`, and nothing calls the token
//!   endpoint for it again until it is replaced;
//! - transient failures leave the credential untouched and back off
//!   (1 s, 2 s, 4 s … 60 s) so a broken provider is not hammered;
//! - across replicas, a refresh token is sent by one holder of a leased,
//!   fenced claim, which confirms just before sending that it still holds
//!   the claim and that the credential is the one it read, renews the
//!   lease while the call runs, and stores the result only if its fence
//!   still holds. A replica takes over only once the lease has lapsed, and
//!   then reads the credential again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::HttpClient;
use crate::jwt::SubjectGrant;
use crate::providers::ProviderLabel;
use crate::providers::{ConnectionError, Grant, Provider};
use sidekey_base::clock::Clock;
use sidekey_base::metrics::Metrics;
use sidekey_base::secret::Secret;
use sidekey_vault::{Claim, ClaimOutcome, Confirmed, Credential, Fenced, Owner, Store, StoreError};

/// What a token endpoint granted.
#[derive(Debug)]
pub struct TokenGrant {
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    /// Unix seconds (see `token_response::parse`).
    pub expires_at: Option<i64>,
    pub scopes: Option<Vec<String>>,
    /// Values of `from = "token"` connection fields the answer carried,
    /// each checked against its pattern.
    pub connection: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A connection value (in the token URL, or in the answer) is missing
    /// or not accepted.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// The grant (refresh token, code) is dead: the user must reconnect.
    #[error("token endpoint refused the grant: {0}")]
    Refused(String),
    /// The provider rejected our client id/secret: an operator problem.
    #[error(
        "token endpoint rejected the client credentials ({0}); check client_id and client_secret"
    )]
    BadClient(String),
    /// Timeout, connection failure, 5xx, or an unreadable answer.
    #[error("token endpoint failed: {0}")]
    Transient(String),
    /// The endpoint granted a token sidekey must not use (not a bearer token).
    #[error("token endpoint granted an unusable token: {0}")]
    Unusable(String),
}

/// Why a usable token could not be had. The edge answers each with its own
/// code (`reauth_required`, `credential_missing`, `refresh_failed`,
/// `store_unavailable`/`internal_error`).
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The provider refused the refresh token, or none is stored: the user
    /// must connect again.
    #[error("reauthorisation required for {}", .0.name)]
    ReauthRequired(ProviderLabel),
    #[error("no credential for {}", .0.name)]
    CredentialMissing(ProviderLabel),
    /// A token response carried a connection value its pattern refuses
    /// (nothing was stored).
    #[error("connection value {} for {} not accepted", .1, .0.name)]
    BadConnection(ProviderLabel, String),
    /// The token endpoint failed in a way a later attempt may not.
    #[error("token refresh failed for {}", .0.name)]
    Failed(ProviderLabel),
    /// The token endpoint refused a JWT bearer grant for this subject
    /// (`invalid_grant`, `unauthorized_client`): the organisation has not
    /// allowed it.
    #[error("JWT bearer grant refused for {}", .0.name)]
    GrantRefused(ProviderLabel, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Outcome of a forced refresh, for the refresh tool.
#[derive(Debug)]
pub enum Forced {
    /// A new token was fetched (by this call or one it waited for).
    Refreshed(Arc<Credential>),
    /// The credential cannot be refreshed but is still usable.
    Active(Arc<Credential>),
}

/// How much longer than one token call a refresh claim lasts: the bound
/// after which another replica takes over from one that died mid-refresh.
/// A holder renews its lease to this length before it sends the refresh
/// token and every [`RENEW_EVERY`] while the call runs, so a holder that
/// is alive but cut off from the database still has its call end (under
/// its own deadline) before anyone else may send the same token.
pub const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// How often a holder renews its lease while its token call runs.
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// Between two attempts at a claim step whose database connection failed.
const STEP_RETRY: Duration = Duration::from_millis(25);
/// How long a claim step (confirming, releasing) is tried again.
const STEP_PATIENCE: Duration = Duration::from_secs(1);
/// How often a replica waiting on another's refresh looks again, when no
/// change notification wakes it first.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Serialises refreshes per credential: in this process with a lock per
/// credential (one task per replica goes further), across processes with
/// a claim in the store (one replica calls the token endpoint). Transient
/// failures start a back-off that the store shares between replicas.
pub struct RefreshCoordinator {
    store: Arc<Store>,
    client: HttpClient,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// One deadline for a whole token call (answer headers and body).
    timeout: Duration,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The last token this process fetched for each credential: for the
    /// refresh tool's cooldown and the skew cap.
    fetched: Mutex<HashMap<String, Fetched>>,
    /// Providers whose skew was capped at half a token's lifetime and
    /// that were warned about it (once each).
    skew_warned: Mutex<std::collections::HashSet<String>>,
}

/// A token fetched from the token endpoint.
#[derive(Clone, Copy, Debug)]
struct Fetched {
    /// Unix seconds.
    at: i64,
    /// The credential generation it was stored as; a later write (admin
    /// PUT, reconnect) makes this entry stale.
    generation: u64,
    /// Seconds it was issued for, if it expires.
    lifetime: Option<i64>,
}

/// The skew actually used: the provider's `refresh_skew_secs`, but at most
/// half the lifetime the token was issued with (`issued_lifetime`, known
/// for tokens sidekey fetched itself; a token stored through the admin API
/// has only a remaining lifetime). A token living 5 s with a 60 s skew
/// would otherwise be "due" the moment it arrives, and every call would
/// refresh it again. Returns the skew and whether the cap applied.
pub fn effective_skew(p: &Provider, issued_lifetime: Option<i64>) -> (i64, bool) {
    match issued_lifetime {
        Some(l) if p.refresh_skew_secs > l / 2 => (l / 2, true),
        _ => (p.refresh_skew_secs, false),
    }
}

impl RefreshCoordinator {
    pub fn new(
        store: Arc<Store>,
        client: HttpClient,
        clock: Clock,
        metrics: Arc<Metrics>,
        timeout: Duration,
    ) -> Self {
        RefreshCoordinator {
            store,
            client,
            clock,
            metrics,
            timeout,
            locks: Mutex::new(HashMap::new()),
            fetched: Mutex::new(HashMap::new()),
            skew_warned: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// How long a claim lasts: longer than the token call it covers.
    pub fn lease(&self) -> Duration {
        self.timeout + LEASE_MARGIN
    }

    /// What this process fetched as the current generation of `key`.
    fn fetched(&self, key: &str, c: &Credential) -> Option<Fetched> {
        sidekey_base::sync::lock(&self.fetched)
            .get(key)
            .copied()
            .filter(|f| f.generation == c.generation)
    }

    fn needs_refresh(&self, p: &Provider, owner: &Owner, c: &Credential) -> bool {
        let Some(e) = c.expires_at else { return false };
        let now = self.clock.now();
        // The configured skew is the most any token gets (a short-lived
        // one's is capped below it): far enough from expiry, nothing else
        // need be looked up. This is every proxied call's path; the
        // lookup below takes a lock both workers share.
        if e.saturating_sub(p.refresh_skew_secs) > now {
            return false;
        }
        let lifetime = self
            .fetched(&owner.key(&p.name), c)
            .and_then(|f| f.lifetime);
        let (skew, capped) = effective_skew(p, lifetime);
        if capped {
            let first = sidekey_base::sync::lock(&self.skew_warned).insert(p.name.clone());
            if first {
                tracing::warn!(
                    provider = %p.name,
                    refresh_skew_secs = p.refresh_skew_secs,
                    token_lifetime_secs = lifetime,
                    "tokens live no longer than refresh_skew_secs; refreshing at half their lifetime instead (lower refresh_skew_secs to silence this)"
                );
            }
        }
        e.saturating_sub(skew) <= now
    }

    /// Within the provider's cooldown after a successful refresh that
    /// produced the credential's current generation?
    fn cooling_down(&self, p: &Provider, owner: &Owner, c: &Credential) -> bool {
        let now = self.clock.now();
        let within = |at: i64| now < at.saturating_add(p.refresh_cooldown_secs);
        // `refreshed_at` is stored with the credential, so the cooldown
        // holds across replicas; the local record covers older records.
        p.refresh_cooldown_secs > 0
            && (c.refreshed_at.is_some_and(within)
                || self
                    .fetched(&owner.key(&p.name), c)
                    .is_some_and(|f| within(f.at)))
    }

    fn mark_fetched(&self, key: &str, now: i64, c: &Credential) {
        let mut m = sidekey_base::sync::lock(&self.fetched);
        // One entry per credential refreshed by this process; drop old
        // ones if that ever grows large.
        if m.len() >= 65_536 {
            m.retain(|_, f| now.saturating_sub(f.at) < 86_400);
        }
        m.insert(
            key.to_owned(),
            Fetched {
                at: now,
                generation: c.generation,
                lifetime: c.expires_at.map(|e| e.saturating_sub(now)),
            },
        );
    }

    fn expired(&self, c: &Credential) -> bool {
        c.expires_at.is_some_and(|e| e <= self.clock.now())
    }

    fn refreshable(&self, p: &Provider, c: &Credential) -> bool {
        p.can_refresh() && (c.refresh_token.is_some() || p.grant.fetched_on_demand())
    }

    /// A credential ready to inject: refreshed first when it expires within
    /// the provider's skew. `Ok(None)` when the owner has none.
    pub async fn usable(
        &self,
        p: &Provider,
        owner: &Owner,
    ) -> Result<Option<Arc<Credential>>, RefreshError> {
        let cur = self
            .store
            .credential(owner, &p.name)
            .await
            .map_err(RefreshError::from)?;
        let Some(c) = cur else {
            if p.grant == Grant::ClientCredentials {
                return self.refresh(p, owner, None, false).await.map(Some);
            }
            return Ok(None);
        };
        if c.reauth_required {
            return Err(RefreshError::ReauthRequired(p.label()));
        }
        if !self.needs_refresh(p, owner, &c) {
            return Ok(Some(c));
        }
        if !self.refreshable(p, &c) {
            return if self.expired(&c) {
                Err(RefreshError::ReauthRequired(p.label()))
            } else {
                Ok(Some(c))
            };
        }
        match self.refresh(p, owner, Some(c.generation), false).await {
            Ok(fresh) => Ok(Some(fresh)),
            // Refreshing early failed, but the token has not expired yet:
            // use it rather than fail a call that would still succeed.
            Err(RefreshError::Failed(_)) if !self.expired(&c) => Ok(Some(c)),
            Err(e) => Err(e),
        }
    }

    /// After the upstream refused the token of generation `seen`: refresh
    /// unless someone already replaced it. `None` if it cannot be refreshed.
    pub async fn after_reject(
        &self,
        p: &Provider,
        owner: &Owner,
        seen: u64,
    ) -> Result<Option<Arc<Credential>>, RefreshError> {
        if p.grant == Grant::JwtBearer {
            return self.after_reject_subject(p, owner, seen).await;
        }
        let cur = self
            .store
            .credential_uncached(owner, &p.name)
            .await
            .map_err(RefreshError::from)?;
        match cur {
            Some(c) if c.generation != seen && !c.reauth_required => return Ok(Some(Arc::new(c))),
            Some(c) if !self.refreshable(p, &c) => return Ok(None),
            None if p.grant != Grant::ClientCredentials => return Ok(None),
            _ => {}
        }
        self.refresh(p, owner, Some(seen), true).await.map(Some)
    }

    /// The refresh tool: refresh now if the credential can be refreshed.
    pub async fn force(&self, p: &Provider, owner: &Owner) -> Result<Option<Forced>, RefreshError> {
        let cur = self
            .store
            .credential_uncached(owner, &p.name)
            .await
            .map_err(RefreshError::from)?;
        let c = match cur {
            None if p.grant == Grant::ClientCredentials => {
                return self
                    .refresh(p, owner, None, true)
                    .await
                    .map(|c| Some(Forced::Refreshed(c)));
            }
            None => return Ok(None),
            Some(c) => c,
        };
        if c.reauth_required {
            return Err(RefreshError::ReauthRequired(p.label()));
        }
        if !self.refreshable(p, &c) {
            return if self.expired(&c) {
                Err(RefreshError::ReauthRequired(p.label()))
            } else {
                Ok(Some(Forced::Active(Arc::new(c))))
            };
        }
        // The tool is called by an LLM, which may call it in a loop: a
        // token refreshed moments ago is as good as a new one.
        if !self.expired(&c) && self.cooling_down(p, owner, &c) {
            self.metrics.refresh(&p.name, "cooldown");
            return Ok(Some(Forced::Active(Arc::new(c))));
        }
        self.refresh(p, owner, Some(c.generation), true)
            .await
            .map(|c| Some(Forced::Refreshed(c)))
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = sidekey_base::sync::lock(&self.locks);
        m.entry(key.to_owned()).or_default().clone()
    }

    fn release(&self, key: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut m = sidekey_base::sync::lock(&self.locks);
        // Two references: the map's and ours. Anyone else waiting holds a
        // third, and the entry stays for them.
        if Arc::strong_count(&lock) == 2 {
            m.remove(key);
        }
    }

    /// The single-flight core. `seen` is the generation the caller judged;
    /// if the stored credential moved on, the caller gets the newer one.
    ///
    /// Boxed: a refresh (lock, cluster claim, token endpoint call) is a
    /// future of kilobytes that `usable`, on every request's path, would
    /// otherwise carry inline although it runs once per token lifetime.
    fn refresh<'a>(
        &'a self,
        p: &'a Provider,
        owner: &'a Owner,
        seen: Option<u64>,
        force: bool,
    ) -> futures_util::future::BoxFuture<'a, Result<Arc<Credential>, RefreshError>> {
        self.refresh_for(p, owner, seen, force, None)
    }

    /// [`RefreshCoordinator::refresh`], for a JWT bearer subject when `g`
    /// is given (the assertion is signed under the claim).
    fn refresh_for<'a>(
        &'a self,
        p: &'a Provider,
        owner: &'a Owner,
        seen: Option<u64>,
        force: bool,
        g: Option<&'a SubjectGrant>,
    ) -> futures_util::future::BoxFuture<'a, Result<Arc<Credential>, RefreshError>> {
        Box::pin(async move {
            let key = owner.key(&p.name);
            let lock = self.lock_for(&key);
            let result = {
                let _guard = lock.lock().await;
                self.refresh_locked(p, owner, seen, force, g).await
            };
            self.release(&key, lock);
            result
        })
    }

    /// Under this process's lock: use a newer credential if one appeared,
    /// otherwise claim the refresh cluster-wide, or wait for the holder.
    async fn refresh_locked(
        &self,
        p: &Provider,
        owner: &Owner,
        mut seen: Option<u64>,
        force: bool,
        g: Option<&SubjectGrant>,
    ) -> Result<Arc<Credential>, RefreshError> {
        let claim_key = claim_key(owner, &p.name);
        // A waiter gives up after a holder's whole lease plus one call.
        let give_up = tokio::time::Instant::now() + self.lease() + self.timeout;
        loop {
            // Registered before the checks, so a change between the check
            // and the wait still wakes us.
            let changed = self.store.caches().changed.notified();
            let cur = self
                .store
                .credential_uncached(owner, &p.name)
                .await
                .map_err(RefreshError::from)?;
            if let Some(c) = &cur {
                let moved_on = seen.is_some_and(|g| g != c.generation);
                // A token got with another key (or for another subject)
                // is never used for this grant.
                let fits = g.is_none_or(|g| g.fits(c));
                if c.reauth_required {
                    match g {
                        None => return Err(RefreshError::ReauthRequired(p.label())),
                        Some(g) if fits && (moved_on || self.refusal_fresh(c)) => {
                            return Err(jwt::refused(p, g));
                        }
                        Some(_) => {}
                    }
                } else if fits
                    // Someone refreshed while this caller queued (here or on
                    // another replica): their token is newer than the one
                    // judged, and usable if it has not expired (even when it
                    // is already within the skew, as short-lived tokens are;
                    // refreshing again would make a storm).
                    && ((moved_on && !self.expired(c))
                        || (!force && !self.needs_refresh(p, owner, c)))
                {
                    self.metrics.refresh(&p.name, "shared");
                    return Ok(Arc::new(c.clone()));
                }
            } else if !p.grant.fetched_on_demand() {
                return Err(RefreshError::CredentialMissing(p.label()));
            }
            match self
                .store
                .claim(&claim_key, self.lease(), self.clock.now_millis())
                .await
                .map_err(RefreshError::from)?
            {
                ClaimOutcome::Granted(claim) => {
                    // Confirm under the claim that the credential is still
                    // the one read: another replica may have refreshed
                    // between our read and our claim (its claim released,
                    // or its lease lapsed, just before ours was granted).
                    // Its token is then the one to use, and ours would be a
                    // second call with a refresh token it already spent.
                    let before = cur.as_ref().map(|c| c.generation);
                    let confirmed = step(STEP_PATIENCE, || {
                        self.store
                            .confirm_refresh(&claim, self.lease(), owner, &p.name, before)
                    })
                    .await;
                    match confirmed {
                        Ok(Some(base)) => {
                            return self.refresh_claimed(p, owner, base, &claim, g).await;
                        }
                        Ok(None) => {
                            self.release_claim(&claim, None).await;
                            // (No credential before: any one now is newer.)
                            seen = Some(before.unwrap_or(u64::MAX));
                            continue;
                        }
                        Err(e) => {
                            self.release_claim(&claim, None).await;
                            return Err(RefreshError::from(e));
                        }
                    }
                }
                ClaimOutcome::BackingOff(_) => {
                    self.metrics.refresh(&p.name, "backoff");
                    return Err(RefreshError::Failed(p.label()));
                }
                ClaimOutcome::Held => {
                    // Another replica is calling the token endpoint. Its
                    // write (or its release) notifies; poll in case the
                    // notification is lost.
                    if tokio::time::Instant::now() >= give_up {
                        return Err(RefreshError::Failed(p.label()));
                    }
                    if seen.is_none() {
                        seen = cur.as_ref().map(|c| c.generation);
                    }
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep(WAIT_POLL) => {}
                    }
                }
            }
        }
    }

    /// Holding the claim (confirmed for `base`): one token call, then a
    /// compare-and-swap on the record this call started from and on the
    /// claim's fence, then the claim is released.
    async fn refresh_claimed(
        &self,
        p: &Provider,
        owner: &Owner,
        base: Confirmed,
        claim: &Claim,
        g: Option<&SubjectGrant>,
    ) -> Result<Arc<Credential>, RefreshError> {
        let cur = &base.credential;
        let grant = match (cur, p.grant) {
            (_, Grant::JwtBearer) => {
                let Some(g) = g else {
                    self.release_claim(claim, None).await;
                    return Err(RefreshError::CredentialMissing(p.label()));
                };
                self.metrics.token_call(&p.name);
                self.exchange_assertion(claim, p, g).await
            }
            (_, Grant::ClientCredentials) => {
                let scope = p.scopes.join(&p.scope_separator);
                let mut params = vec![("grant_type", "client_credentials")];
                if !scope.is_empty() {
                    params.push(("scope", scope.as_str()));
                }
                self.metrics.token_call(&p.name);
                let none = BTreeMap::new();
                let values = cur.as_ref().map_or(&none, |c| &c.connection);
                self.token_call_renewing(claim, p, &params, values).await
            }
            (Some(c), _) => {
                let Some(rt) = &c.refresh_token else {
                    self.release_claim(claim, None).await;
                    return Err(RefreshError::ReauthRequired(p.label()));
                };
                self.metrics.token_call(&p.name);
                self.token_call_renewing(
                    claim,
                    p,
                    &[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", rt.expose()),
                    ],
                    &c.connection,
                )
                .await
            }
            (None, _) => {
                self.release_claim(claim, None).await;
                return Err(RefreshError::CredentialMissing(p.label()));
            }
        };
        let now = self.clock.now();
        let subject = g;
        match grant {
            Ok(g) => {
                let prev = cur.clone().unwrap_or_default();
                let rotated = g.refresh_token.is_some();
                let jwt_grant = subject.map(SubjectGrant::record);
                // A JWT bearer token is got again with a new assertion; a
                // refresh token some endpoints add is never needed.
                let refresh_token = match jwt_grant {
                    Some(_) => None,
                    None => g.refresh_token.or(prev.refresh_token.clone()),
                };
                let mut next = Credential {
                    access_token: Some(g.access_token),
                    // Keep the old refresh token unless the provider rotated it.
                    refresh_token,
                    expires_at: g.expires_at,
                    scopes: g.scopes.unwrap_or(prev.scopes.clone()),
                    username: prev.username.clone(),
                    password: prev.password.clone(),
                    reauth_required: false,
                    reauth_reason: None,
                    refreshed_at: Some(now),
                    updated_at: now,
                    generation: prev.generation,
                    // A token response's values replace the stored ones
                    // (Salesforce answers its instance_url on every refresh).
                    connection: {
                        let mut m = prev.connection.clone();
                        m.extend(g.connection);
                        m
                    },
                    jwt_key: prev.jwt_key.clone(),
                    jwt: jwt_grant.or(prev.jwt.clone()),
                };
                // The admin API and the OAuth callback write credentials
                // without the claim. A credential replaced (or deleted)
                // while the token endpoint answered wins: it is not
                // overwritten by a token from the old grant.
                let done = self.commit(claim, p, owner, &base, &mut next).await?;
                if done == Fenced::Lost {
                    return Err(self.lost(p, owner));
                }
                // Durable before use: if the provider rotated the refresh
                // token, the old one is already dead.
                self.store.flush().await.map_err(RefreshError::from)?;
                self.release_claim(claim, Some(false)).await;
                if done == Fenced::Moved {
                    return self.latest(p, owner).await;
                }
                self.mark_fetched(&owner.key(&p.name), now, &next);
                self.metrics.refresh(&p.name, "refreshed");
                tracing::info!(
                    provider = %p.name,
                    owner = %owner.describe(),
                    rotated,
                    expires_at = next.expires_at,
                    "token refreshed"
                );
                Ok(Arc::new(next))
            }
            Err(TokenError::Refused(code)) if subject.is_some() => {
                let g = subject.expect("matched");
                self.refused_claimed(claim, p, owner, &base, g, code, now)
                    .await
            }
            Err(TokenError::Refused(code)) => {
                let mut marked = false;
                if let Some(mut c) = cur.clone() {
                    c.reauth_required = true;
                    c.reauth_reason = Some(code.clone());
                    c.updated_at = now;
                    let done = self.commit(claim, p, owner, &base, &mut c).await?;
                    if done == Fenced::Lost {
                        return Err(self.lost(p, owner));
                    }
                    marked = done == Fenced::Written;
                    self.store.flush().await.map_err(RefreshError::from)?;
                }
                self.release_claim(claim, None).await;
                if !marked {
                    return self.latest(p, owner).await;
                }
                self.metrics.refresh(&p.name, "reauth_required");
                tracing::warn!(
                    provider = %p.name,
                    owner = %owner.describe(),
                    error = %code,
                    "refresh token refused; credential marked reauth_required"
                );
                Err(RefreshError::ReauthRequired(p.label()))
            }
            Err(TokenError::Connection(e)) => {
                self.release_claim(claim, Some(true)).await;
                self.metrics.refresh(&p.name, "failed");
                tracing::warn!(
                    provider = %p.name,
                    owner = %owner.describe(),
                    error = %e,
                    "token refresh not usable: connection value; credential left unchanged"
                );
                Err(match e {
                    ConnectionError::Missing(_) => RefreshError::CredentialMissing(p.label()),
                    ConnectionError::Bad(f) | ConnectionError::Unknown(f) => {
                        RefreshError::BadConnection(p.label(), f)
                    }
                })
            }
            Err(e) => {
                self.release_claim(claim, Some(true)).await;
                self.metrics.refresh(&p.name, "failed");
                tracing::warn!(
                    provider = %p.name,
                    owner = %owner.describe(),
                    error = %e,
                    "token refresh failed; credential left unchanged, back-off started"
                );
                Err(RefreshError::Failed(p.label()))
            }
        }
    }

    /// The token call, with the claim's lease renewed every
    /// [`RENEW_EVERY`] while it runs (the call's own deadline bounds both).
    /// A renewal that fails is tried again at the next tick: the lease
    /// confirmed before the call already outlasts the call.
    async fn token_call_renewing(
        &self,
        claim: &Claim,
        p: &Provider,
        params: &[(&str, &str)],
        connection: &BTreeMap<String, String>,
    ) -> Result<TokenGrant, TokenError> {
        let renew = async {
            let start = tokio::time::Instant::now() + RENEW_EVERY;
            let mut tick = tokio::time::interval_at(start, RENEW_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match self.store.renew_claim(claim, self.lease()).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            provider = %p.name,
                            "refresh claim taken over while its token call ran; its answer will not be stored"
                        );
                        std::future::pending::<()>().await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "refresh claim not renewed; trying again")
                    }
                }
            }
        };
        tokio::select! {
            r = self.token_call(p, params, connection) => r,
            _ = renew => unreachable!("the renewal loop never ends"),
        }
    }

    /// Stores a refresh's result under the claim; a failed connection is
    /// tried again while the lease surely runs (renewed at most
    /// [`RENEW_EVERY`] ago, for longer than [`LEASE_MARGIN`]). An attempt
    /// whose answer was lost but which landed is found as `Moved`, and
    /// [`RefreshCoordinator::latest`] then reads what it wrote.
    async fn commit(
        &self,
        claim: &Claim,
        p: &Provider,
        owner: &Owner,
        base: &Confirmed,
        cred: &mut Credential,
    ) -> Result<Fenced, RefreshError> {
        let deadline = tokio::time::Instant::now() + LEASE_MARGIN;
        let generation = cred.generation;
        loop {
            cred.generation = generation;
            match self
                .store
                .commit_refresh(claim, owner, &p.name, base, cred)
                .await
            {
                Err(e)
                    if e.is_unavailable()
                        && tokio::time::Instant::now() + STEP_RETRY < deadline =>
                {
                    tracing::debug!(error = %e, "refresh result not stored yet; trying again");
                    tokio::time::sleep(STEP_RETRY).await;
                }
                r => return r.map_err(RefreshError::from),
            }
        }
    }

    /// The claim lapsed and was taken over while this holder's call ran
    /// (it could not renew for a whole lease): the other holder's result is
    /// the one that counts.
    fn lost(&self, p: &Provider, owner: &Owner) -> RefreshError {
        self.metrics.refresh(&p.name, "failed");
        tracing::warn!(
            provider = %p.name,
            owner = %owner.describe(),
            "refresh claim lapsed during the token call and was taken over; this result was not stored"
        );
        RefreshError::Failed(p.label())
    }

    /// One token call under one deadline (headers and body together), so
    /// it ends before the claim's lease does.
    async fn token_call(
        &self,
        p: &Provider,
        params: &[(&str, &str)],
        connection: &BTreeMap<String, String>,
    ) -> Result<TokenGrant, TokenError> {
        match tokio::time::timeout(
            self.timeout,
            call_token_endpoint(
                &self.client,
                p,
                params,
                connection,
                self.timeout,
                self.clock.now(),
            ),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(TokenError::Transient("timed out".into())),
        }
    }

    /// The credential someone else wrote while our call ran.
    async fn latest(&self, p: &Provider, owner: &Owner) -> Result<Arc<Credential>, RefreshError> {
        match self
            .store
            .credential_uncached(owner, &p.name)
            .await
            .map_err(RefreshError::from)?
        {
            Some(c) if c.reauth_required => Err(RefreshError::ReauthRequired(p.label())),
            Some(c) => {
                self.metrics.refresh(&p.name, "shared");
                Ok(Arc::new(c))
            }
            None => Err(RefreshError::CredentialMissing(p.label())),
        }
    }

    /// Releases a claim; a failure here only means the lease lapses.
    async fn release_claim(&self, claim: &Claim, failed: Option<bool>) {
        let now_ms = self.clock.now_millis();
        if let Err(e) = step(STEP_PATIENCE, || self.store.release(claim, failed, now_ms)).await {
            tracing::debug!(error = %e, "refresh claim not released; its lease will lapse");
        }
    }

    /// Forgets a credential's back-off (it was replaced by the admin API).
    pub async fn reset(&self, owner: &Owner, provider: &str) {
        if let Err(e) = self.store.clear_backoff(&claim_key(owner, provider)).await {
            tracing::debug!(error = %e, "refresh back-off not cleared");
        }
    }
}

/// Runs a claim step again while its database connection fails, for up to
/// `patience`: a connection cut under it (a pooler or failover,
/// `pg_terminate_backend`) is replaced by the next attempt. The steps given
/// are safe to repeat: each is fenced, and one whose answer was lost finds
/// its own work done.
async fn step<T, F>(patience: Duration, mut attempt: impl FnMut() -> F) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match attempt().await {
            Err(e) if e.is_unavailable() && tokio::time::Instant::now() + STEP_RETRY < deadline => {
                tracing::debug!(error = %e, "refresh claim step failed; trying again");
                tokio::time::sleep(STEP_RETRY).await;
            }
            r => return r,
        }
    }
}

/// The claim that serialises refreshes of one credential cluster-wide.
fn claim_key(owner: &Owner, provider: &str) -> String {
    format!("refresh:{}", owner.key(provider))
}

mod jwt;
mod token_call;
pub use token_call::call_token_endpoint;
#[cfg(test)]
use token_call::{parse_grant, sanitize_code};

#[cfg(test)]
mod tests;
