//! Ports for listeners that a test has to name before it starts them (in a
//! `public_url`, in a README command).
//!
//! Not from the ephemeral range: a port taken with `bind(":0")` and then
//! released is in the range the kernel also hands to outgoing connections,
//! and with tests running in parallel one of those can take it before the
//! server binds it ("Address already in use"). Below that range (Linux:
//! 32768–60999) only listeners that ask for a port by number compete, and
//! a random pick makes two tests choosing the same one unlikely.

use std::hash::BuildHasher;

pub fn listen_port() -> u16 {
    let (lo, hi) = (20_000u16, 32_000u16);
    for _ in 0..1000 {
        // A fresh RandomState is randomly keyed: a random number without a
        // dependency.
        let r = std::collections::hash_map::RandomState::new().hash_one(0u8);
        let port = lo + (r % u64::from(hi - lo)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {lo} and {hi} on 127.0.0.1");
}
