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
use zeroize::Zeroizing;

use super::{Sealed, Store, StoreError};

const TREE: &str = "connect_tickets";

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
pub enum ClaimOutcome {
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
    fn connect_tickets(&self) -> Result<Sealed, StoreError> {
        Ok(Sealed {
            name: TREE,
            tree: self.db.open_tree(TREE)?,
        })
    }

    /// The record key for a raw ticket: a keyed hash, so the store (or a
    /// stolen disk) never holds a usable link.
    pub fn connect_ticket_id(&self, ticket: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key).expect("any key size");
        mac.update(b"connect-ticket\0");
        mac.update(ticket.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    pub fn put_connect_ticket(&self, id: &str, t: &ConnectTicket) -> Result<(), StoreError> {
        self.connect_tickets()?.put(&self.keys, id.as_bytes(), t)
    }

    pub fn connect_ticket(&self, id: &str) -> Result<Option<ConnectTicket>, StoreError> {
        match self.connect_tickets()?.get_as(&self.keys, id.as_bytes()) {
            Err(StoreError::Crypto { .. }) | Err(StoreError::Decode(_)) => Ok(None),
            other => other,
        }
    }

    /// Binds the ticket to `browser`, atomically: of two concurrent first
    /// opens exactly one wins.
    pub fn claim_connect_ticket(
        &self,
        id: &str,
        browser: &str,
        now: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        let t = self.connect_tickets()?;
        loop {
            let p = match t.get(&self.keys, id.as_bytes()) {
                Ok(Some(p)) => p,
                Ok(None) | Err(StoreError::Crypto { .. }) => return Ok(ClaimOutcome::Unknown),
                Err(e) => return Err(e),
            };
            let Ok(mut rec) = t.decode::<ConnectTicket>(id.as_bytes(), &p) else {
                return Ok(ClaimOutcome::Unknown);
            };
            if rec.expires_at <= now {
                return Ok(ClaimOutcome::Expired);
            }
            match &rec.browser {
                Some(b) if b == browser => return Ok(ClaimOutcome::Reopened(rec)),
                Some(_) => return Ok(ClaimOutcome::Taken),
                None => {}
            }
            rec.browser = Some(browser.to_owned());
            let plain = Zeroizing::new(serde_json::to_vec(&rec).expect("serialisable"));
            let new = t.seal(&self.keys, id.as_bytes(), &plain);
            if t.tree
                .compare_and_swap(id.as_bytes(), Some(&p.raw), Some(new))?
                .is_ok()
            {
                return Ok(ClaimOutcome::Claimed(rec));
            }
        }
    }

    /// Deletes tickets that expired before `before`; returns how many.
    pub fn gc_connect_tickets(&self, before: i64) -> Result<usize, StoreError> {
        let t = self.connect_tickets()?;
        let mut n = 0;
        for item in t.tree.iter() {
            let (k, v) = item?;
            let expired = match t.open(&self.keys, &k, v) {
                Ok(p) => t
                    .decode::<ConnectTicket>(&k, &p)
                    .map(|r| r.expires_at < before)
                    .unwrap_or(true),
                Err(_) => true,
            };
            if expired {
                t.tree.remove(&k)?;
                n += 1;
            }
        }
        Ok(n)
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

    #[test]
    fn first_claim_wins_and_gc_drops_expired() {
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
        s.put_connect_ticket(&id, &ticket(100)).unwrap();
        assert!(matches!(
            s.claim_connect_ticket(&id, "b1", 10).unwrap(),
            ClaimOutcome::Claimed(t) if t.browser.as_deref() == Some("b1")
        ));
        assert!(matches!(
            s.claim_connect_ticket(&id, "b1", 10).unwrap(),
            ClaimOutcome::Reopened(_)
        ));
        assert_eq!(
            s.claim_connect_ticket(&id, "b2", 10).unwrap(),
            ClaimOutcome::Taken
        );
        assert_eq!(
            s.claim_connect_ticket(&id, "b1", 100).unwrap(),
            ClaimOutcome::Expired
        );
        assert_eq!(
            s.claim_connect_ticket("nope", "b1", 10).unwrap(),
            ClaimOutcome::Unknown
        );
        let id2 = s.connect_ticket_id("other");
        s.put_connect_ticket(&id2, &ticket(300)).unwrap();
        assert_eq!(s.gc_connect_tickets(200).unwrap(), 1);
        assert!(s.connect_ticket(&id).unwrap().is_none());
        assert!(s.connect_ticket(&id2).unwrap().is_some());
    }
}
