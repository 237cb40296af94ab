//! One reader for OAuth token responses, as real servers and libraries
//! send them: the refresh path, the authorization-code exchange and the
//! admin credential PUT all go through [`parse`].
//!
//! Seen in the wild and accepted: `expires_in` as `3599`, `3599.0` or
//! `"3599"` (Authlib, requests-oauthlib, PHP servers); `expires_at` next to
//! `expires_in` (Authlib's token dict); `scope` as a string or a list;
//! extra fields such as Entra's `ext_expires_in` or `id_token`, ignored.
//! Refused: a `token_type` that is not a bearer token (DPoP, MAC): such a
//! token is bound to a key sidekey does not hold, and sending it as
//! `Bearer` would at best fail and at worst downgrade its protection.

use serde_json::Value;

use sidekey_base::secret::Secret;

/// The fields sidekey keeps from a token response.
#[derive(Debug, Default)]
pub struct TokenResponse {
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    /// Unix seconds; the earlier of `expires_at` and `now + expires_in`.
    pub expires_at: Option<i64>,
    pub scopes: Option<Vec<String>>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenResponseError {
    /// Never quotes the value: it sits next to secrets.
    #[error("{0} has the wrong type (expected {1})")]
    WrongType(&'static str, &'static str),
    #[error(
        "token_type {0:?} is not supported: sidekey only sends bearer tokens (DPoP and MAC tokens need a key sidekey does not hold)"
    )]
    UnsupportedTokenType(String),
}

/// `token_type` values that are bearer tokens. Slack names its bearer
/// tokens `bot` and `user`.
const BEARER_TYPES: &[&str] = &["bearer", "bot", "user"];

/// Reads a token response object. `now` is unix seconds.
pub fn parse(
    v: &serde_json::Map<String, Value>,
    now: i64,
) -> Result<TokenResponse, TokenResponseError> {
    let secret = |k: &'static str| -> Result<Option<Secret>, TokenResponseError> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(Secret::new(s.as_str()))),
            Some(_) => Err(TokenResponseError::WrongType(k, "a string")),
        }
    };
    if let Some(t) = v.get("token_type") {
        match t {
            Value::Null => {}
            Value::String(s) if s.is_empty() => {}
            Value::String(s) if BEARER_TYPES.iter().any(|b| s.eq_ignore_ascii_case(b)) => {}
            Value::String(s) => {
                return Err(TokenResponseError::UnsupportedTokenType(
                    s.chars()
                        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                        .take(32)
                        .collect(),
                ));
            }
            _ => return Err(TokenResponseError::WrongType("token_type", "a string")),
        }
    }
    let expires_in = seconds(v, "expires_in")?.filter(|s| *s > 0);
    let expires_at = seconds(v, "expires_at")?.filter(|s| *s > 0);
    let from_in = expires_in.map(|s| now.saturating_add(s));
    let expires_at = match (expires_at, from_in) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let scopes = match v.get("scope") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.split([' ', ','])
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(TokenResponseError::WrongType(
                    "scope",
                    "a string or a list of strings",
                ))?
                .into_iter()
                .filter(|x| !x.is_empty())
                .collect(),
        ),
        Some(_) => {
            return Err(TokenResponseError::WrongType(
                "scope",
                "a string or a list of strings",
            ));
        }
    };
    Ok(TokenResponse {
        access_token: secret("access_token")?,
        refresh_token: secret("refresh_token")?,
        expires_at,
        scopes,
    })
}

/// A number of seconds given as an integer, a float or a numeric string.
/// Fractions are dropped (an expiry is never made later than given);
/// values beyond the i64 range saturate.
fn seconds(
    v: &serde_json::Map<String, Value>,
    k: &'static str,
) -> Result<Option<i64>, TokenResponseError> {
    let wrong = TokenResponseError::WrongType(k, "a number of seconds");
    let f = match v.get(k) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                return Ok(Some(i));
            }
            n.as_f64().ok_or(wrong)?
        }
        Some(Value::String(s)) => {
            let s = s.trim();
            if let Ok(i) = s.parse::<i64>() {
                return Ok(Some(i));
            }
            s.parse::<f64>().map_err(|_| wrong.clone())?
        }
        Some(_) => return Err(wrong),
    };
    if !f.is_finite() {
        return Err(TokenResponseError::WrongType(k, "a number of seconds"));
    }
    // `as` saturates at the i64 bounds.
    Ok(Some(f.floor() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Result<TokenResponse, TokenResponseError> {
        parse(v.as_object().unwrap(), 1_000)
    }

    #[test]
    fn numbers_in_every_shape() {
        for e in [json!(5), json!(5.0), json!("5"), json!("5.0"), json!(5.9)] {
            let r = p(json!({"access_token": "a", "expires_in": e})).unwrap();
            assert_eq!(r.expires_at, Some(1_005), "{e}");
        }
        let r = p(json!({"access_token": "a", "expires_in": 1e300})).unwrap();
        assert_eq!(r.expires_at, Some(i64::MAX));
        assert!(p(json!({"access_token": "a", "expires_in": "soon"})).is_err());
        assert!(p(json!({"access_token": "a", "expires_in": true})).is_err());
    }

    #[test]
    fn earlier_expiry_wins_and_extras_are_ignored() {
        let r = p(
            json!({"access_token": "a", "expires_in": 3599, "expires_at": 2_000,
                         "ext_expires_in": 7200, "id_token": "x", "token_type": "Bearer"}),
        )
        .unwrap();
        assert_eq!(r.expires_at, Some(2_000));
        let r = p(json!({"access_token": "a", "expires_in": 10, "expires_at": 2_000})).unwrap();
        assert_eq!(r.expires_at, Some(1_010));
    }

    #[test]
    fn scope_as_string_or_list() {
        let r = p(json!({"access_token": "a", "scope": ["a", "b"]})).unwrap();
        assert_eq!(r.scopes.unwrap(), vec!["a", "b"]);
        let r = p(json!({"access_token": "a", "scope": "a b,c"})).unwrap();
        assert_eq!(r.scopes.unwrap(), vec!["a", "b", "c"]);
        assert!(p(json!({"access_token": "a", "scope": 3})).is_err());
    }

    #[test]
    fn only_bearer_token_types() {
        for t in ["Bearer", "bearer", "bot", "user"] {
            assert!(
                p(json!({"access_token": "a", "token_type": t})).is_ok(),
                "{t}"
            );
        }
        for t in ["DPoP", "MAC", "pop"] {
            assert!(matches!(
                p(json!({"access_token": "a", "token_type": t})),
                Err(TokenResponseError::UnsupportedTokenType(_))
            ));
        }
    }
}
