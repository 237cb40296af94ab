//! `elevenlabs::parse_signature` / `verify_signature` on arbitrary input.
//!
//! Neither may panic, and `verify_signature` may accept only a header that
//! carries the correct HMAC-SHA256 of `t.body` for a `t` within tolerance.
//!
//! Input layout: 4 bytes clock offset, 2 bytes tolerance, 1 flag byte, then
//! `header \n body`. With flag bit 0 set, a correct `v0=` for the header's
//! own `t` is appended, so the fuzzer also explores the accepting path.
#![no_main]

use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use sidekey::elevenlabs::{parse_signature, verify_signature};

const SECRET: &[u8] = b"wsec_fuzz_0123456789abcdef";

fn hmac_hex(t: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET).unwrap();
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    // A realistic clock (2023..2159) and tolerance (0..18 h), as the server
    // passes them: `now` comes from the system clock, tolerance from config.
    let now =
        1_700_000_000i64 + i64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
    let tolerance = i64::from(u16::from_le_bytes([data[4], data[5]]));
    let flags = data[6];
    let rest = &data[7..];
    let (h, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut header = String::from_utf8_lossy(h).into_owned();

    let parsed = parse_signature(&header);
    if let Ok((_, sigs)) = &parsed {
        assert!(!sigs.is_empty());
        assert!(sigs.iter().all(|s| s.len() == 32));
    }
    if flags & 1 == 1
        && let Ok((t, _)) = parsed
    {
        header.push_str(",v0=");
        header.push_str(&hmac_hex(t, body));
    }

    let result = verify_signature(&header, body, SECRET, now, tolerance);
    if result.is_ok() {
        let (t, sigs) = parse_signature(&header).expect("accepted header parses");
        assert!(
            (i128::from(now) - i128::from(t)).abs() <= i128::from(tolerance),
            "accepted t={t} outside tolerance {tolerance} of now={now}"
        );
        let expected = hmac_hex(t, body);
        assert!(
            sigs.iter()
                .any(|s| { s.iter().map(|b| format!("{b:02x}")).collect::<String>() == expected }),
            "accepted a header without the correct signature: {header:?}"
        );
    }
    // The same header with a different secret never verifies.
    assert!(
        verify_signature(&header, body, b"another secret", now, tolerance).is_err(),
        "verified under the wrong secret: {header:?}"
    );
});
