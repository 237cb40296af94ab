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

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{Backend, Store, StoreError, Tree};

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
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key).expect("any key size");
        mac.update(b"connect-ticket\0");
        mac.update(ticket.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
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
    /// every replica): of two concurrent first opens exactly one wins.
    pub async fn claim_connect_ticket(
        &self,
        id: &str,
        browser: &str,
        now: i64,
    ) -> Result<TicketClaim, StoreError> {
        let k = id.as_bytes();
        loop {
            let Some(raw) = on_backend!(self, b => b.get(Tree::Tickets, k).await)? else {
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
            if on_backend!(self, b => b.cas(Tree::Tickets, k, Some(&raw), Some(&new)).await)? {
                return Ok(TicketClaim::Claimed(rec));
            }
        }
    }

    /// Deletes tickets that expired before `before`; returns how many.
    pub async fn gc_connect_tickets(&self, before: i64) -> Result<usize, StoreError> {
        self.gc_expired::<ConnectTicket>(Tree::Tickets, before, |t| t.expires_at)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::{KeyRing, MasterKey, StoreOptions};
    use super::*;

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
    }
}
