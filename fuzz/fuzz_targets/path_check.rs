//! `providers::check_path` on arbitrary input.
//!
//! It must never panic, and whatever it accepts must not be able to leave
//! the provider's `base_url`: no `.`/`..` segment after one, two or three
//! rounds of percent-decoding, no backslash, NUL or other control
//! character, no encoded slash that would add a segment, no `//`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_decode::decode_rounds;

mod percent_decode {
    /// Minimal percent-decoder (independent of the one `check_path` uses),
    /// applied `rounds` times; `None` if a round is not valid UTF-8.
    pub fn decode_rounds(s: &str, rounds: usize) -> Option<String> {
        let mut cur = s.to_owned();
        for _ in 0..rounds {
            let b = cur.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%'
                    && i + 2 < b.len()
                    && hex(b[i + 1]).is_some()
                    && hex(b[i + 2]).is_some()
                {
                    out.push(hex(b[i + 1]).unwrap() * 16 + hex(b[i + 2]).unwrap());
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            cur = String::from_utf8(out).ok()?;
        }
        Some(cur)
    }

    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(rest) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = sidekey::providers::check_path(rest) else {
        return;
    };
    assert_eq!(p.raw, rest, "raw must be the input unchanged");
    if rest.is_empty() {
        assert!(p.decoded().is_empty());
        return;
    }
    assert!(
        rest.starts_with('/'),
        "accepted a path without a leading /: {rest:?}"
    );
    assert!(
        p.decoded().starts_with('/'),
        "decoded {:?} lost its leading /",
        p.decoded()
    );

    // The decoded form (what the allow list sees and the upstream decodes to).
    let d = p.decoded();
    assert!(
        !d.contains('\\'),
        "backslash in accepted path {rest:?} -> {d:?}"
    );
    assert!(!d.contains('\0'), "NUL in accepted path {rest:?} -> {d:?}");
    assert!(
        !d.chars().any(char::is_control),
        "control character in accepted path {rest:?} -> {d:?}"
    );
    let raw_segs: Vec<&str> = rest[1..].split('/').collect();
    let dec_segs: Vec<&str> = d[1..].split('/').collect();
    assert_eq!(
        raw_segs.len(),
        dec_segs.len(),
        "decoding added or removed a segment (encoded slash?): {rest:?} -> {d:?}"
    );
    for (i, seg) in dec_segs.iter().enumerate() {
        assert!(
            *seg != ".." && *seg != ".",
            "dot segment in accepted path {rest:?} -> {d:?}"
        );
        assert!(
            !seg.is_empty() || i == dec_segs.len() - 1,
            "empty segment (//) in accepted path {rest:?}"
        );
    }

    // Double and triple encodings: every raw segment, decoded up to three
    // times, is never a dot segment and never holds a slash or backslash.
    for seg in &raw_segs {
        for rounds in 1..=3 {
            let Some(s) = decode_rounds(seg, rounds) else {
                break;
            };
            assert!(
                s != ".." && s != ".",
                "{rounds}x-encoded dot segment accepted: {rest:?}"
            );
            assert!(
                !s.contains(['/', '\\']),
                "{rounds}x-encoded slash or backslash accepted: {rest:?}"
            );
        }
    }
});
