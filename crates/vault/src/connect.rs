//! Connect-link tickets: the records behind `<public_url>/connect/<ticket>`.
//!
//! The ticket in the URL is a bearer secret (256 random bits). Its record is
//! keyed by a keyed hash of it ([`Store::connect_ticket_id`], HMAC-SHA256
//! under the store's random index key, as for phone numbers), and the value
//! is sealed like every other record (AAD `connect_tickets/<id>`). (The raw
//! ticket only appears, sealed, in the `return_to` of a page flow's OAuth
//! state.)
//!
//! API (the whole surface; a Postgres backend implements the same):
//!
//! - `connect_ticket_id(ticket) -> String` — the record key for a raw ticket
//!   (base64url of the keyed hash). Pure; needs the store's index key.
//! - `put_connect_ticket(id, &ConnectTicket)` — insert or replace. Not yet
//!   durable: the caller flushes before it answers.
//! - `connect_ticket(id) -> Option<ConnectTicket>` — read; a record that
//!   no longer opens (e.g. sealed under a retired key) reads as `None`.
//! - `claim_connect_ticket(id, browser, now) -> ClaimOutcome` — the browser
//!   binding, atomic: the first claim stores `browser` (a hash of that
//!   browser's cookie) and wins; a claim with the same `browser` is a
//!   re-open; any other browser gets `Taken`. Expired and unknown tickets
//!   are never claimed. (Postgres: `UPDATE … SET browser = $2 WHERE id = $1
//!   AND browser IS NULL AND expires_at > $3`, then read the row.)
//! - `gc_connect_tickets(before) -> usize` — deletes tickets that expired
//!   before `before` (and any that no longer open).
//! - `claim_csrf(id) -> String` — the CSRF token of a link's "Continue"
//!   form, for a browser that has no cookie yet: a keyed hash of the ticket
//!   id, so only sidekey (any replica) can make it.
//!
//! Pending credentials (`[connect] confirm = true`): a completed callback
//! stores the new credential here instead of among the credentials, under
//! a keyed hash of a one-time code that goes to the app; the app's confirm
//! moves it into place.
//!
//! - `connect_code_id(code) -> String` — the record key for a raw code.
//! - `put_pending_credential(id, &PendingCredential)` — insert. Not yet
//!   durable: the caller flushes.
//! - `take_pending_credential(id) -> Option<PendingCredential>` — removes and
//!   returns it: each code is usable once across every replica (the removal
//!   decides, as for OAuth states); a record that no longer opens reads as
//!   `None`.
//! - `gc_pending_credentials(before) -> usize` — deletes those that expired
//!   before `before`.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::backend::Backend;
use crate::{Credential, Store, StoreError, Tree};

/// One connect link.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectTicket {
    /// Whose accounts the page connects.
    pub user: String,
    /// Providers listed on the page (all OAuth-capable).
    pub providers: Vec<String>,
    /// Where "Done — back to <app>" leads.
    #[serde(default)]
    pub return_to: Option<String>,
    /// Shown on the page so a forwarded link is recognisable.
    #[serde(default)]
    pub user_label: Option<String>,
    pub created_at: i64,
    /// Unix seconds; the link neither opens nor acts after this.
    pub expires_at: i64,
    /// base64url SHA-256 of the binding cookie of the browser that opened
    /// the link first; `None` until then.
    #[serde(default)]
    pub browser: Option<String>,
    /// Links made by admin `oauth/start`: opening one binds the browser and
    /// redirects here instead of showing the page.
    #[serde(default)]
    pub authorize_url: Option<String>,
    /// Per-connection values for the flows this link starts (each
    /// provider takes the fields it declares).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub connection: std::collections::BTreeMap<String, String>,
}

/// A credential from a completed callback, waiting for the app's
/// confirmation; invisible to the proxy and the admin API until then.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingCredential {
    pub user: String,
    pub provider: String,
    pub credential: Credential,
    pub created_at: i64,
    /// Unix seconds; the code confirms nothing after this.
    pub expires_at: i64,
}

/// What a claim did.
#[derive(Debug, PartialEq, Eq)]
pub enum TicketClaim {
    /// This browser is the first: the ticket is now bound to it.
    Claimed(ConnectTicket),
    /// Already bound to this same browser.
    Reopened(ConnectTicket),
    /// Bound to another browser.
    Taken,
    Expired,
    Unknown,
}

impl Store {
    /// The record key for a raw ticket: a keyed hash, so the store (or a
    /// stolen disk or dump) never holds a usable link.
    pub fn connect_ticket_id(&self, ticket: &str) -> String {
        self.keyed_b64(b"connect-ticket\0", ticket)
    }

    pub async fn put_connect_ticket(&self, id: &str, t: &ConnectTicket) -> Result<(), StoreError> {
        self.put_as(Tree::Tickets, id.as_bytes(), t).await
    }

    pub async fn connect_ticket(&self, id: &str) -> Result<Option<ConnectTicket>, StoreError> {
        match self.get_as(Tree::Tickets, id.as_bytes()).await {
            Err(StoreError::Crypto { .. }) | Err(StoreError::Decode(_)) => Ok(None),
            other => other,
        }
    }

    /// Binds the ticket to `browser`, atomically (in the database, for
    /// every replica): of two concurrent first claims exactly one wins.
    pub async fn claim_connect_ticket(
        &self,
        id: &str,
        browser: &str,
        now: i64,
    ) -> Result<TicketClaim, StoreError> {
        let k = id.as_bytes();
        loop {
            let Some(raw) = self.backend.get(Tree::Tickets, k).await? else {
                return Ok(TicketClaim::Unknown);
            };
            let Ok((mut rec, _)) = self.decode::<ConnectTicket>(Tree::Tickets, k, &raw) else {
                return Ok(TicketClaim::Unknown);
            };
            if rec.expires_at <= now {
                return Ok(TicketClaim::Expired);
            }
            match &rec.browser {
                Some(b) if b == browser => return Ok(TicketClaim::Reopened(rec)),
                Some(_) => return Ok(TicketClaim::Taken),
                None => {}
            }
            rec.browser = Some(browser.to_owned());
            let new = self.seal_json(Tree::Tickets, k, &rec);
            if self
                .backend
                .cas(Tree::Tickets, k, Some(&raw), Some(&new))
                .await?
            {
                return Ok(TicketClaim::Claimed(rec));
            }
        }
    }

    /// The CSRF token of the "Continue" form that claims link `id`: the
    /// browser has no cookie yet, so the token is derived from what only
    /// the store holds.
    pub fn claim_csrf(&self, id: &str) -> String {
        self.keyed_b64(b"connect-claim-csrf\0", id)
    }

    /// The record key for a raw confirmation code (a bearer secret).
    pub fn connect_code_id(&self, code: &str) -> String {
        self.keyed_b64(b"connect-code\0", code)
    }

    fn keyed_b64(&self, domain: &[u8], value: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key).expect("any key size");
        mac.update(domain);
        mac.update(value.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    pub async fn put_pending_credential(
        &self,
        id: &str,
        p: &PendingCredential,
    ) -> Result<(), StoreError> {
        self.put_as(Tree::PendingConnect, id.as_bytes(), p).await
    }

    /// Removes and returns a pending credential: of two confirms with the
    /// same code, on any replicas, exactly one gets it.
    pub async fn take_pending_credential(
        &self,
        id: &str,
    ) -> Result<Option<PendingCredential>, StoreError> {
        let k = id.as_bytes();
        let Some(raw) = self.backend.remove(Tree::PendingConnect, k).await? else {
            return Ok(None);
        };
        Ok(self
            .decode::<PendingCredential>(Tree::PendingConnect, k, &raw)
            .ok()
            .map(|(p, _)| p))
    }

    /// Deletes pending credentials that expired before `before`.
    pub async fn gc_pending_credentials(&self, before: i64) -> Result<usize, StoreError> {
        self.gc_expired::<PendingCredential>(Tree::PendingConnect, before, |p| p.expires_at)
            .await
    }

    /// Deletes tickets that expired before `before`; returns how many.
    pub async fn gc_connect_tickets(&self, before: i64) -> Result<usize, StoreError> {
        self.gc_expired::<ConnectTicket>(Tree::Tickets, before, |t| t.expires_at)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, MasterKey, StoreOptions};

    fn ticket(exp: i64) -> ConnectTicket {
        ConnectTicket {
            user: "u".into(),
            providers: vec!["g".into()],
            return_to: None,
            user_label: None,
            created_at: 0,
            expires_at: exp,
            browser: None,
            authorize_url: None,
            connection: Default::default(),
        }
    }

    #[tokio::test]
    async fn first_claim_wins_and_gc_drops_expired() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(
            &dir.path().join("db"),
            KeyRing::new(MasterKey::from_bytes(&[1; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        let id = s.connect_ticket_id("raw-ticket");
        assert_ne!(id, s.connect_ticket_id("raw-ticket2"));
        assert!(!id.contains("raw-ticket"));
        s.put_connect_ticket(&id, &ticket(100)).await.unwrap();
        assert!(matches!(
            s.claim_connect_ticket(&id, "b1", 10).await.unwrap(),
            TicketClaim::Claimed(t) if t.browser.as_deref() == Some("b1")
        ));
        assert!(matches!(
            s.claim_connect_ticket(&id, "b1", 10).await.unwrap(),
            TicketClaim::Reopened(_)
        ));
        assert_eq!(
            s.claim_connect_ticket(&id, "b2", 10).await.unwrap(),
            TicketClaim::Taken
        );
        assert_eq!(
            s.claim_connect_ticket(&id, "b1", 100).await.unwrap(),
            TicketClaim::Expired
        );
        assert_eq!(
            s.claim_connect_ticket("nope", "b1", 10).await.unwrap(),
            TicketClaim::Unknown
        );
        let id2 = s.connect_ticket_id("other");
        s.put_connect_ticket(&id2, &ticket(300)).await.unwrap();
        assert_eq!(s.gc_connect_tickets(200).await.unwrap(), 1);
        assert!(s.connect_ticket(&id).await.unwrap().is_none());
        assert!(s.connect_ticket(&id2).await.unwrap().is_some());
        assert_ne!(s.claim_csrf(&id), s.claim_csrf(&id2));
        assert_eq!(s.claim_csrf(&id), s.claim_csrf(&id));
    }

    #[tokio::test]
    async fn pending_credentials_are_taken_once_and_gc_drops_expired() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(
            &dir.path().join("db"),
            KeyRing::new(MasterKey::from_bytes(&[2; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        let pending = |exp| PendingCredential {
            user: "u".into(),
            provider: "g".into(),
            credential: Credential {
                access_token: Some("at-pending-SECRET".into()),
                ..Default::default()
            },
            created_at: 0,
            expires_at: exp,
        };
        let a = s.connect_code_id("code-a");
        let b = s.connect_code_id("code-b");
        assert_ne!(a, b);
        assert!(!a.contains("code-a"));
        s.put_pending_credential(&a, &pending(100)).await.unwrap();
        s.put_pending_credential(&b, &pending(300)).await.unwrap();
        let got = s.take_pending_credential(&a).await.unwrap().unwrap();
        assert_eq!(got.user, "u");
        assert_eq!(
            got.credential.access_token.as_ref().map(|t| t.expose()),
            Some("at-pending-SECRET")
        );
        assert!(s.take_pending_credential(&a).await.unwrap().is_none());
        s.put_pending_credential(&a, &pending(100)).await.unwrap();
        assert_eq!(s.gc_pending_credentials(200).await.unwrap(), 1);
        assert!(s.take_pending_credential(&a).await.unwrap().is_none());
        assert!(s.take_pending_credential(&b).await.unwrap().is_some());
        // Nothing pending is a credential.
        assert!(
            s.list_credentials(&crate::Owner::User("u".into()))
                .await
                .unwrap()
                .is_empty()
        );
    }
}
