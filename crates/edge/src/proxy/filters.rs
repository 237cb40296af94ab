//! The header filters on both sides of the upstream call: what of the
//! client's request may go upstream, and what of the upstream's answer
//! may go back to the agent.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use sidekey_creds::providers::Provider;

/// Which headers the client sent may go upstream: no credentials of its
/// own, no session, no hop-by-hop, no conversation header. Applied while
/// the upstream request is written ([`sidekey_creds::client::Headers`]).
pub(super) struct ForwardFilter<'a> {
    provider: &'a Provider,
    conv_header: &'a HeaderName,
    /// Names the client's `Connection` header lists (hop-by-hop too).
    listed: Vec<String>,
}

impl<'a> ForwardFilter<'a> {
    pub(super) fn new(
        incoming: &HeaderMap,
        provider: &'a Provider,
        conv_header: &'a HeaderName,
    ) -> Self {
        let listed = incoming
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .collect();
        ForwardFilter {
            provider,
            conv_header,
            listed,
        }
    }
}

impl sidekey_creds::client::HeaderFilter for ForwardFilter<'_> {
    // Runs for every header of every proxied call: the fixed names are one
    // `match` on the name, not a comparison each.
    fn keeps(&self, name: &HeaderName) -> bool {
        let n = name.as_str();
        let refused = match n {
            sidekey_creds::hop_by_hop_names!()
            | "host"
            | "authorization"
            | "cookie"
            | "content-length"
            | "expect" => true,
            // Slack-style `ok: false` answers must be read to be
            // recognised; ask for an uncompressed body.
            "accept-encoding" => !self.provider.conventions.ok_false_auth_errors.is_empty(),
            _ => n.starts_with("x-sidekey-"),
        };
        !(refused
            || name == self.conv_header
            || self.provider.injected_header() == Some(name)
            || self.listed.iter().any(|l| l == n))
    }
}

/// The upstream's headers as the agent may get them: no hop-by-hop
/// headers (nor those its `Connection` names), no `X-Sidekey-*` (only
/// sidekey speaks for sidekey), no `Set-Cookie` or
/// `Strict-Transport-Security` (they would apply to sidekey's origin), and
/// at most one `Content-Length`. `Err` for lengths that disagree: the
/// answer's end is unknown. hyper's parsers already refuse those and
/// sidekey's own exchange merges equal repeats; this holds it for every
/// client.
pub(super) fn filter_answer_headers(h: &mut HeaderMap) -> Result<(), ()> {
    // One pass by name over every header; nothing is built or removed
    // unless something has to go (this runs on every response).
    let mut strip = false;
    let mut lengths = 0;
    let mut listed = false;
    for (n, v) in h.iter() {
        match n.as_str() {
            sidekey_creds::hop_by_hop_names!() | "set-cookie" | "strict-transport-security" => {
                strip = true;
            }
            "content-length" => {
                lengths += 1;
                listed |= v.as_bytes().contains(&b',');
            }
            n => strip |= n.starts_with("x-sidekey-"),
        }
    }
    if lengths > 1 || listed {
        let mut one: Option<u64> = None;
        for v in h.get_all(header::CONTENT_LENGTH) {
            for part in v.to_str().map_err(|_| ())?.split(',') {
                let n: u64 = part.trim().parse().map_err(|_| ())?;
                if one.is_some_and(|m| m != n) {
                    return Err(());
                }
                one = Some(n);
            }
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(one.ok_or(())?));
    }
    if !strip {
        return Ok(());
    }
    if h.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
            // The framing header stays: it is sidekey's to decide.
            .filter(|n| *n != header::CONTENT_LENGTH)
            .collect();
        for n in listed {
            h.remove(n);
        }
    }
    let gone: Vec<HeaderName> = h
        .keys()
        .filter(|n| {
            matches!(
                n.as_str(),
                sidekey_creds::hop_by_hop_names!() | "set-cookie" | "strict-transport-security"
            ) || n.as_str().starts_with("x-sidekey-")
        })
        .cloned()
        .collect();
    for n in gone {
        h.remove(n);
    }
    Ok(())
}
