//! The upstream exchange's answer framing (`client::h1::read_answer`: the
//! same head parser, body decoder and reuse rule a pooled connection uses)
//! on arbitrary bytes from an upstream.
//!
//! Input: byte 0 picks the request (GET, HEAD, POST with a body, DELETE)
//! and whether the upstream closed after the last byte; byte 1 seeds how
//! the rest is cut into reads; the rest is what the upstream sent.
//!
//! It must never panic; the answer must not depend on how the bytes were
//! cut into reads; and a connection is reusable only when the exchange is
//! provably in sync: no request body, a body framed by a length or chunked
//! encoding that ended exactly where the bytes did, no interim answer,
//! no answer without a body (HEAD, 204, 304). The agent gets at most one
//! `Content-Length`, none beside `Transfer-Encoding`, and a body that
//! ended has exactly that length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidekey::client::h1::read_answer;

/// Cuts `data` into reads at points drawn from `seed` (one to 17 pieces).
fn pieces(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut state = u32::from(seed) | 1;
    let mut rest = data;
    let cuts = 1 + (seed % 16) as usize;
    for _ in 0..cuts {
        if rest.is_empty() {
            break;
        }
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let at = (state >> 8) as usize % (rest.len() + 1);
        let (a, b) = rest.split_at(at);
        out.push(a);
        rest = b;
    }
    out.push(rest);
    out
}

fuzz_target!(|input: &[u8]| {
    let [flags, seed, data @ ..] = input else {
        return;
    };
    let (method, with_body) = match flags & 3 {
        0 => ("GET", false),
        1 => ("HEAD", false),
        2 => ("POST", true),
        _ => ("DELETE", false),
    };
    let closed = flags & 4 != 0;
    let whole = read_answer(method, with_body, &[data], closed);
    let cut = read_answer(method, with_body, &pieces(data, *seed), closed);
    assert_eq!(whole, cut, "the answer depends on how the bytes were read");
    let Ok(a) = whole else {
        return;
    };

    assert!((200..=999).contains(&a.status), "final status {}", a.status);
    assert!(a.body.len() <= data.len());
    let values = |name: &str| -> Vec<&[u8]> {
        a.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    };
    let lengths = values("content-length");
    let codings = values("transfer-encoding");
    assert!(lengths.len() <= 1, "more than one Content-Length: {lengths:?}");
    assert!(
        lengths.is_empty() || codings.is_empty(),
        "Content-Length next to Transfer-Encoding"
    );
    let bodyless = method == "HEAD" || a.status == 204 || a.status == 304;
    if let (Some(cl), true, false) = (lengths.first(), a.ended, bodyless) {
        let cl: u64 = std::str::from_utf8(cl).unwrap().parse().unwrap();
        assert_eq!(cl, a.body.len() as u64, "an ended body is not its length");
    }
    if a.reusable {
        assert!(a.ended && a.leftover == 0, "reusable with bytes unaccounted for");
        assert!(!with_body, "reusable after a request body");
        assert!(!bodyless, "reusable after an answer without a body");
        assert!(!a.interim, "reusable after an interim answer");
        assert!(
            !lengths.is_empty() || !codings.is_empty(),
            "reusable without framing"
        );
    }
});
