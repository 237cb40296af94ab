//! Providers that sign the browser's return to the callback (Shopify): the
//! query's `hmac` is checked before the code is exchanged, so a forged
//! callback cannot make sidekey call the token endpoint for a shop the
//! user did not pick.
//!
//! Shopify's rule (shopify.dev, "Implement authorization code grant
//! manually", step "Verify the installation request"; as its own
//! `@shopify/shopify-api` library computes it): every query parameter but
//! `hmac` (and the legacy `signature`), sorted by name, form-encoded and
//! joined with `&`, is HMAC-SHA256'd with the app's client secret; the
//! hex digest must equal `hmac`. The `shop` parameter must be the shop the
//! flow was started for.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a signed callback was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedCallbackError {
    /// No `hmac`, or one that does not match the query.
    BadSignature,
    /// `shop` is not the shop the flow was started for.
    OtherShop,
}

/// Checks a Shopify callback query (`raw_query` as it arrived, without the
/// `?`) against the client secret and the flow's connection values.
pub fn check_shopify(
    raw_query: &str,
    client_secret: &[u8],
    connection: &BTreeMap<String, String>,
) -> Result<(), SignedCallbackError> {
    let mut given = None;
    let mut shop = None;
    let mut rest: Vec<(String, String)> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(raw_query.as_bytes()) {
        match &*k {
            "hmac" => {
                if given.replace(v.into_owned()).is_some() {
                    // Two signatures: which one would be checked is a choice
                    // an attacker could exploit.
                    return Err(SignedCallbackError::BadSignature);
                }
            }
            "signature" => {}
            _ => {
                if k == "shop" {
                    shop = Some(v.to_string());
                }
                rest.push((k.into_owned(), v.into_owned()));
            }
        }
    }
    let given = given.ok_or(SignedCallbackError::BadSignature)?;
    rest.sort();
    let mut message = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in &rest {
        message.append_pair(k, v);
    }
    let message = message.finish();
    let mut mac = Hmac::<Sha256>::new_from_slice(client_secret).expect("any key size");
    mac.update(message.as_bytes());
    let Some(given) = decode_hex(&given) else {
        return Err(SignedCallbackError::BadSignature);
    };
    // Constant time: `verify_slice` compares without an early exit.
    mac.verify_slice(&given)
        .map_err(|_| SignedCallbackError::BadSignature)?;
    if let Some(want) = connection.get("shop") {
        let expected = format!("{want}.myshopify.com");
        if !shop.is_some_and(|s| s.eq_ignore_ascii_case(&expected)) {
            return Err(SignedCallbackError::OtherShop);
        }
    }
    Ok(())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop(s: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("shop".to_owned(), s.to_owned())])
    }

    fn sign(secret: &[u8], message: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(message.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The published example (secret `hush`): parameters in any order,
    /// `hmac` anywhere.
    #[test]
    fn shopifys_example_verifies() {
        let q = "shop=some-shop.myshopify.com&code=0907a61c0c8d55e99db179b68161bc00&hmac=700e2dadb827fcc8609e9d5ce208b2e9cdaab9df07390d2cbca10d7c328fc4bf&timestamp=1337178173&state=0.6784241404160823";
        assert_eq!(check_shopify(q, b"hush", &shop("some-shop")), Ok(()));
        assert_eq!(check_shopify(q, b"hush", &BTreeMap::new()), Ok(()));
    }

    #[test]
    fn tampering_is_refused() {
        let good = "code=0907a61c0c8d55e99db179b68161bc00&hmac=700e2dadb827fcc8609e9d5ce208b2e9cdaab9df07390d2cbca10d7c328fc4bf&shop=some-shop.myshopify.com&state=0.6784241404160823&timestamp=1337178173";
        let bad = SignedCallbackError::BadSignature;
        // Wrong secret, changed code, no hmac, short or non-hex hmac, two.
        assert_eq!(check_shopify(good, b"hush2", &BTreeMap::new()), Err(bad));
        let q = good.replace("code=0907", "code=1907");
        assert_eq!(check_shopify(&q, b"hush", &BTreeMap::new()), Err(bad));
        let q = "code=a&shop=some-shop.myshopify.com&state=s&timestamp=1";
        assert_eq!(check_shopify(q, b"hush", &BTreeMap::new()), Err(bad));
        let q = format!("{good}&hmac=00");
        assert_eq!(check_shopify(&q, b"hush", &BTreeMap::new()), Err(bad));
        let q = good.replace("hmac=700e", "hmac=zz0e");
        assert_eq!(check_shopify(&q, b"hush", &BTreeMap::new()), Err(bad));
        let q = good.replace("&hmac=", "&hmac=&hmac=");
        assert_eq!(check_shopify(&q, b"hush", &BTreeMap::new()), Err(bad));
    }

    /// A genuine signature for another shop than the flow's is refused.
    #[test]
    fn another_shop_is_refused() {
        let q = "code=0907a61c0c8d55e99db179b68161bc00&hmac=700e2dadb827fcc8609e9d5ce208b2e9cdaab9df07390d2cbca10d7c328fc4bf&shop=some-shop.myshopify.com&state=0.6784241404160823&timestamp=1337178173";
        assert_eq!(
            check_shopify(q, b"hush", &shop("other-shop")),
            Err(SignedCallbackError::OtherShop)
        );
    }

    /// Values are signed decoded and form-encoded again (Shopify's `host`
    /// is base64 with `=`), as Shopify's own library does.
    #[test]
    fn encoded_values_are_signed_as_shopify_signs_them() {
        let message = "code=c0de&host=YWRtaW4uc2hvcGlmeS5jb20vc3RvcmUvYWNtZQ%3D%3D&shop=acme.myshopify.com&state=st+1&timestamp=1700000000";
        let h = sign(b"s3cret", message);
        let q = format!(
            "state=st%201&host=YWRtaW4uc2hvcGlmeS5jb20vc3RvcmUvYWNtZQ==&code=c0de&shop=acme.myshopify.com&timestamp=1700000000&hmac={h}"
        );
        assert_eq!(check_shopify(&q, b"s3cret", &shop("acme")), Ok(()));
    }
}
