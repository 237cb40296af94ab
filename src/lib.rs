//! sidekey: a per-user credential vault and tool-call proxy for voice agents.
//!
//! ElevenLabs agents' webhook tools call sidekey instead of Slack, Google or
//! Telegram; sidekey checks the conversation's session token, loads the
//! user's provider token from an encrypted store, refreshes it when needed,
//! injects it and forwards the call. Where things live:
//!
//! - [`config`]     — `config.toml`: parsing, defaults, validation of every key
//! - [`bootstrap`]  — loading keys and certificates; generating dev secrets
//! - [`store`]      — one store API over sled (default) or PostgreSQL (replicas),
//!   every value sealed (XChaCha20-Poly1305), caches, refresh claims
//! - [`session`]    — session tokens (JWT) bound to store records
//! - [`providers`]  — presets, path rules, allow lists, credential injection
//! - [`proxy`]      — the agent-facing request path, as named phases
//! - [`refresh`]    — token refresh: single flight (per process and cluster-wide), rotation, backoff
//! - [`token_response`] — reading token responses (refresh, code exchange, admin PUT)
//! - [`users`]      — end users' ids and phone numbers as callers give them
//! - [`oauth`]      — the authorization-code flow with PKCE
//! - [`connect`]    — the hosted connect page; OAuth flows bound to a browser
//! - [`elevenlabs`] — init and post-call webhooks, tool definitions
//! - [`admin`]      — the main app's API: credentials, users, sessions
//! - [`server`]     — listeners, TLS, routing, graceful shutdown
//! - [`error`]      — every error and the one place it becomes HTTP
//! - [`audit`], [`metrics`], [`limits`] — what operators watch and cap
//! - [`client`], [`body`], [`secret`], [`clock`], [`logging`] — plumbing
//! - [`commands`]   — the CLI commands `main` calls
//! - [`demo`]       — `sidekey echo-upstream`, a local provider for the walkthrough

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod body;
pub mod bootstrap;
pub mod client;
pub mod clock;
pub mod commands;
pub mod config;
pub mod connect;
pub mod demo;
pub mod elevenlabs;
pub mod error;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod oauth;
pub mod providers;
pub mod proxy;
pub mod refresh;
pub mod secret;
pub mod server;
pub mod session;
pub mod store;
pub mod token_response;
pub mod users;

/// Installs ring as the process-wide rustls provider. Call once at start.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
