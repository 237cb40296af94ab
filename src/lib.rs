//! sidekey: a per-user credential vault and tool-call proxy for voice agents.
//!
//! Agents' tools call sidekey instead of Slack, Google or Telegram; sidekey
//! checks the conversation's session token, loads the user's provider token
//! from an encrypted store, refreshes it when needed, injects it and
//! forwards the call. The code lives in one crate per layer, each depending
//! only on the ones below it (ARCHITECTURE.md draws the map):
//!
//! - `sidekey-base`  — secrets, clock, configuration, limits, metrics, TLS roots
//! - `sidekey-vault` — the sealed store over sled or PostgreSQL, caches, GC
//! - `sidekey-creds` — providers, outbound HTTP, token responses, refresh,
//!   sessions, audit, key loading
//! - `sidekey-edge`  — listeners, routing, proxy, admin API, OAuth, connect
//!   page, ElevenLabs webhooks and tool definitions
//! - this crate      — the command line ([`commands`]) and `sidekey
//!   echo-upstream` ([`demo`]); it re-exports the layers under their module
//!   names for the tests and the load tool.

#![forbid(unsafe_code)]

pub mod commands;
pub mod demo;

pub use sidekey_base::{clock, config, errors, limits, logging, metrics, secret, sync, tls, users};
pub use sidekey_creds::{audit, bootstrap, client, providers, refresh, session, token_response};
pub use sidekey_edge::{admin, app, body, connect, elevenlabs, error, oauth, proxy, server};
pub use sidekey_vault as store;

/// Installs ring as the process-wide rustls provider. Call once at start.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
