//! `session::SessionAuthority::verify` on arbitrary tokens.
//!
//! It must never panic, and it may accept only a token whose signed part
//! (`header.payload`) is exactly that of a token sidekey minted: no forged
//! claims, no `alg` swap, no unknown `kid`, no HS256 token verified with
//! the EdDSA key's public half.
//!
//! One store in a temp dir is opened once per process (`OnceLock`), with
//! two sessions minted: one HS256, one EdDSA. The authority under test
//! signs with HS256 and also verifies the EdDSA kid (as during a key
//! rotation), so both algorithms are reachable.
//!
//! Input: first byte selects the mode.
//! - even: the rest, as UTF-8 (lossy), is the token;
//! - odd:  a minted token (HS256 or EdDSA by bit 1) with the rest applied
//!   as edits: pairs of (position, byte) overwrite, a third kind truncates
//!   or splices, so the fuzzer works near valid tokens without a corpus.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use sidekey::clock::Clock;
use sidekey::secret::Secret;
use sidekey::session::{SessionAuthority, SessionKeys};
use sidekey::store::{KeyRing, MasterKey, Store, StoreOptions};

struct Fixture {
    authority: SessionAuthority,
    /// (token, sid, user) for the HS256 and the EdDSA session.
    minted: Vec<(String, String, String)>,
    _dir: PathBuf,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// `$TMPDIR/sidekey-fuzz-jwt/<pid>`; directories of processes that no
/// longer run are removed first, so repeated runs do not pile up stores.
fn store_dir() -> PathBuf {
    let base = std::env::temp_dir().join("sidekey-fuzz-jwt");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<u32>().is_ok() && !PathBuf::from("/proc").join(&name).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create fuzz store dir");
    dir
}

fn ed25519_pem() -> Secret {
    let rng = ring::rand::SystemRandom::new();
    let der = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("generate Ed25519");
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Secret::new(pem)
}

/// The store is sled's, whose calls complete without waiting: one poll
/// gives the answer (no runtime needed in the fuzz loop).
fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a sled store call waited"),
    }
}

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let dir = store_dir();
        let store = Arc::new(
            Store::open(
                &dir.join("db"),
                KeyRing::new(MasterKey::from_bytes(&[7; 32]), vec![]),
                StoreOptions::default(),
            )
            .expect("open fuzz store"),
        );
        let hs = SessionKeys::generate_hs256();
        let ed = ed25519_pem();
        let ten_years = 10 * 365 * 86_400;
        let mut minted = Vec::new();
        // EdDSA signer, only to mint the EdDSA token.
        let ed_authority = SessionAuthority::new(
            SessionKeys::new(&ed, &[]).expect("EdDSA key"),
            "sidekey".into(),
            "sidekey-proxy".into(),
            store.clone(),
            Clock::system(),
        );
        // Under test: signs HS256, still verifies the EdDSA kid.
        let authority = SessionAuthority::new(
            SessionKeys::new(&hs, std::slice::from_ref(&ed)).expect("HS256 key"),
            "sidekey".into(),
            "sidekey-proxy".into(),
            store.clone(),
            Clock::system(),
        );
        for (a, user) in [(&authority, "alice"), (&ed_authority, "bob")] {
            let m = ready(a.mint(user, vec!["slack".into(), "google".into()], ten_years, None))
                .expect("mint");
            minted.push((m.token.expose().to_owned(), m.sid, user.to_owned()));
        }
        for (token, sid, user) in &minted {
            let v = ready(authority.verify(token)).expect("minted token verifies");
            assert_eq!(v.sid(), sid);
            assert_eq!(v.user(), user);
        }
        Fixture {
            authority,
            minted,
            _dir: dir,
        }
    })
}

fn signed_part(token: &str) -> Option<&str> {
    token.rsplit_once('.').map(|(signed, _)| signed)
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let base = &f.minted[usize::from(mode >> 1 & 1)].0;
        let mut t = base.as_bytes().to_vec();
        for op in rest.chunks(3) {
            match op {
                [0, pos, len] => {
                    // Truncate, or cut `len` bytes at `pos`.
                    let p = usize::from(*pos) * t.len() / 256;
                    let end = (p + usize::from(*len)).min(t.len());
                    t.drain(p..end);
                }
                [1, pos, b] => {
                    let p = usize::from(*pos) * (t.len() + 1) / 256;
                    t.insert(p.min(t.len()), *b);
                }
                [_, pos, b] if !t.is_empty() => {
                    let p = usize::from(*pos) * t.len() / 256;
                    t[p] = *b;
                }
                _ => {}
            }
        }
        String::from_utf8_lossy(&t).into_owned()
    };

    if let Ok(v) = ready(f.authority.verify(&token)) {
        let (_, sid, user) = f
            .minted
            .iter()
            .find(|(_, sid, _)| sid == v.sid())
            .expect("accepted a session id that was never minted");
        assert_eq!(v.user(), user);
        let original = &f.minted.iter().find(|(_, s, _)| s == sid).unwrap().0;
        assert_eq!(
            signed_part(&token),
            signed_part(original),
            "accepted a token whose signed part differs from the minted one: {token:?}"
        );
    }
});
