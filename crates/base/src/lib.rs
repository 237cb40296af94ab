//! The foundation every other sidekey crate stands on: secrets that never
//! print, the clock, configuration, limits, metrics, TLS roots and the error
//! primitives. Nothing here knows the store, a provider or a route.

#![forbid(unsafe_code)]

pub mod clock;
pub mod colour;
pub mod config;
pub mod errors;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod secret;
pub mod sync;
pub mod tls;
pub mod users;
