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

#[cfg(test)]
mod tests {
    use super::*;

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
