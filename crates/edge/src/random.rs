//! Random tokens and URL-safe base64: what states, tickets, cookies, codes
//! and MCP session ids are made of. A leaf: it needs nothing of the edge.

use base64::Engine;

/// Unpadded URL-safe base64.
pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `n` random bytes as unpadded URL-safe base64.
pub fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    b64url(&b)
}
