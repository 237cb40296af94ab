//! End users as the rest of sidekey sees them: ids and phone numbers in
//! the forms the admin API and ElevenLabs' webhooks give them.

/// E.164 (`+` and 7–15 digits). Accepts common decorations (spaces, dashes,
/// dots, parentheses, a `00` prefix, `tel:` and `sip:` URIs).
pub fn normalize_phone(s: &str) -> Option<String> {
    let mut t = s.trim();
    for p in ["tel:", "sip:", "sips:"] {
        if let Some(r) = t.strip_prefix(p) {
            t = r;
        }
    }
    let t = t.split(['@', ';']).next().unwrap_or("");
    let rest = t
        .strip_prefix('+')
        .or_else(|| t.strip_prefix("00"))
        .unwrap_or(t);
    let digits: String = rest
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.'))
        .collect();
    if digits.len() < 7
        || digits.len() > 15
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return None;
    }
    Some(format!("+{digits}"))
}

/// An e-mail address as a JWT subject may carry it: `local@domain`, the
/// domain lower-cased. Deliberately narrower than RFC 5322 (no quoted local
/// parts, no comments, no IP-literal domains): the address is matched
/// against allowed domains and sent as a claim, so anything that could be
/// read two ways is refused.
pub fn normalize_email(s: &str) -> Option<String> {
    let s = s.trim();
    let (local, domain) = s.rsplit_once('@')?;
    let local_ok = (1..=64).contains(&local.len())
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._%+-'".contains(&b))
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..");
    let domain = domain.to_ascii_lowercase();
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = domain.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    (local_ok && domain_ok).then(|| format!("{local}@{domain}"))
}

/// The domain of an address (after its last `@`), lower-cased.
pub fn email_domain(s: &str) -> Option<String> {
    s.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            normalize_email(" Alice.B+cal@Acme.COM ").as_deref(),
            Some("Alice.B+cal@acme.com")
        );
        for bad in [
            "alice",
            "@acme.com",
            "alice@",
            "alice@acme",
            "a..b@acme.com",
            "alice@-acme.com",
            "al ice@acme.com",
            "alice@acme.com\r\nbcc: x",
            "\"a\"@acme.com",
            "alice@[127.0.0.1]",
        ] {
            assert_eq!(normalize_email(bad), None, "{bad}");
        }
        assert_eq!(email_domain("a@Acme.com").as_deref(), Some("acme.com"));
    }

    #[test]
    fn phones() {
        assert_eq!(
            normalize_phone("+1 (555) 123-4567").as_deref(),
            Some("+15551234567")
        );
        assert_eq!(
            normalize_phone("0044 20 7946 0958").as_deref(),
            Some("+442079460958")
        );
        assert_eq!(
            normalize_phone("tel:+15551234567").as_deref(),
            Some("+15551234567")
        );
        assert_eq!(
            normalize_phone("sip:+15551234567@pbx.example.com").as_deref(),
            Some("+15551234567")
        );
        assert_eq!(
            normalize_phone("15551234567").as_deref(),
            Some("+15551234567")
        );
        assert!(normalize_phone("+1").is_none());
        assert!(normalize_phone("anonymous").is_none());
        assert!(normalize_phone("+1234567890123456").is_none());
    }
}
