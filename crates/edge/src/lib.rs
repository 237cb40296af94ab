//! The edge: everything a caller reaches. Listeners, workers and routing
//! (`server`), the agent path (`proxy`), the main app's API (`admin`), the
//! OAuth flow and the hosted connect page (`oauth`, `connect`), the
//! ElevenLabs webhooks and tool definitions (`elevenlabs`). Typed errors of
//! the lower layers become `ApiError` and HTTP answers here and only here.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod connect;
pub mod elevenlabs;
pub mod error;
mod jwt;
mod jwt_keys;
pub mod mcp;
pub mod oauth;
pub mod proxy;
pub mod random;
pub mod request;
pub mod retell;
pub mod server;
pub mod tools;
pub mod vapi;
pub mod views;
mod voice;
mod webhook_body;
