//! The credential layer: what a provider is and how its token is injected,
//! the outbound HTTP client, token responses, refresh (single flight,
//! rotation, back-off), session tokens, the audit log and key loading. It
//! speaks to the vault and knows nothing of routes or HTTP answers: its
//! errors are typed here and become HTTP only at the edge.

#![forbid(unsafe_code)]

pub mod audit;
pub mod bootstrap;
pub mod client;
pub mod jwt;
pub mod owners;
pub mod providers;
pub mod refresh;
pub mod session;
pub mod token_response;
pub mod tools;
