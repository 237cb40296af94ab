//! JWT assertions on the fake token endpoint ([`crate::token`]): keys made
//! at test time (none is ever committed), Google-style service-account
//! files, and a verifier that checks each assertion's signature with the
//! public key and every claim, as a real authorization server would:
//! expired, issued in the future, living too long, the wrong audience, an
//! unknown issuer or key id, and a reused `jti` are all refused.

use std::collections::{HashMap, HashSet};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::pkcs1::EncodeRsaPrivateKey;
use serde_json::{Value, json};

/// `grant_type` of RFC 7523 §2.1.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// A key pair made for one test run.
#[derive(Clone)]
pub struct TestKey {
    pub alg: &'static str,
    /// PEM of the private key (PKCS#8, or PKCS#1 / SEC1 when asked).
    pub private_pem: String,
    pub public_pem: String,
    pub kid: String,
}

impl TestKey {
    /// An RSA key for RS256 (or PS256 with [`TestKey::with_alg`]).
    pub fn rsa(bits: usize) -> TestKey {
        let k = rsa::RsaPrivateKey::new(&mut rand_core_06::OsRng, bits).unwrap();
        TestKey {
            alg: "RS256",
            private_pem: k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            public_pem: k.to_public_key().to_public_key_pem(LineEnding::LF).unwrap(),
            kid: format!("rsa-{bits}-{}", random_hex(4)),
        }
    }

    /// A P-256 key for ES256.
    pub fn ec() -> TestKey {
        let k = p256::SecretKey::random(&mut rand_core_06::OsRng);
        TestKey {
            alg: "ES256",
            private_pem: k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            public_pem: k.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
            kid: format!("ec-{}", random_hex(4)),
        }
    }

    pub fn with_alg(mut self, alg: &'static str) -> TestKey {
        self.alg = alg;
        self
    }

    /// The same RSA key as PKCS#1 (`BEGIN RSA PRIVATE KEY`).
    pub fn pkcs1_pem(&self) -> String {
        use rsa::pkcs8::DecodePrivateKey;
        rsa::RsaPrivateKey::from_pkcs8_pem(&self.private_pem)
            .unwrap()
            .to_pkcs1_pem(LineEnding::LF)
            .unwrap()
            .to_string()
    }

    fn decoding(&self) -> DecodingKey {
        match self.alg {
            "ES256" => DecodingKey::from_ec_pem(self.public_pem.as_bytes()).unwrap(),
            _ => DecodingKey::from_rsa_pem(self.public_pem.as_bytes()).unwrap(),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self.alg {
            "ES256" => Algorithm::ES256,
            "PS256" => Algorithm::PS256,
            _ => Algorithm::RS256,
        }
    }
}

fn random_hex(n: usize) -> String {
    (0..n).map(|_| format!("{:02x}", rand_byte())).collect()
}

fn rand_byte() -> u8 {
    use rand_core_06::RngCore;
    let mut b = [0u8; 1];
    rand_core_06::OsRng.fill_bytes(&mut b);
    b[0]
}

/// A Google service-account key file for `key`, as the Cloud console
/// downloads it.
pub fn service_account_json(key: &TestKey, client_email: &str, token_uri: &str) -> Value {
    json!({
        "type": "service_account",
        "project_id": "sidekey-test",
        "private_key_id": key.kid,
        "private_key": key.private_pem,
        "client_email": client_email,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com"
    })
}

/// What the fake's authorization server trusts and expects.
#[derive(Default)]
pub struct Verifier {
    /// Grant assertions: issuer → its key (with `kid`).
    pub issuers: HashMap<String, TestKey>,
    /// `aud` every grant assertion must carry.
    pub grant_audience: String,
    /// The `scope` claim a grant assertion must carry; `None`: none at all.
    pub grant_scope: Option<String>,
    /// Subjects the organisation allowed; others are refused with
    /// `refuse_with`. `None`: any.
    pub allowed_subjects: Option<HashSet<String>>,
    pub refuse_with: String,
    /// Client assertions (private_key_jwt): the client id and its key.
    pub client: Option<(String, TestKey)>,
    /// Every `jti` seen, to refuse a replayed client assertion.
    seen_jti: HashSet<String>,
    /// Exchanges granted, per subject.
    pub exchanges: HashMap<String, usize>,
    /// Why assertions were refused, in order.
    pub refused: Vec<String>,
    /// Every assertion received (grant and client), for secret scans.
    pub assertions: Vec<String>,
}

/// Why the fake refuses, as the error code it answers and a reason.
pub type Refusal = (&'static str, String);

fn now() -> i64 {
    crate::unix_now()
}

impl Verifier {
    /// Checks a signed assertion against `key`: signature, `alg`, `kid`,
    /// `aud`, `exp` (not past, at most an hour after `iat`), `iat` (not in
    /// the future). Returns its claims.
    fn check(
        &mut self,
        token: &str,
        key: &TestKey,
        audience: &str,
        max_life: i64,
    ) -> Result<Value, String> {
        self.assertions.push(token.to_owned());
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("header: {e}"))?;
        if header.alg != key.algorithm() {
            return Err(format!("alg {:?}, expected {}", header.alg, key.alg));
        }
        if header.kid.as_deref() != Some(key.kid.as_str()) {
            return Err(format!("kid {:?}, expected {}", header.kid, key.kid));
        }
        let mut v = Validation::new(key.algorithm());
        v.leeway = 0;
        v.set_audience(&[audience]);
        v.set_required_spec_claims(&["exp", "iat", "iss", "sub", "aud"]);
        let data = jsonwebtoken::decode::<Value>(token, &key.decoding(), &v)
            .map_err(|e| format!("verify: {e}"))?;
        let c = data.claims;
        let iat = c["iat"].as_i64().ok_or("iat is not a number")?;
        let exp = c["exp"].as_i64().ok_or("exp is not a number")?;
        if iat > now() + 5 {
            return Err("iat in the future".into());
        }
        if exp - iat > max_life {
            return Err(format!("exp is {}s after iat, over {max_life}", exp - iat));
        }
        Ok(c)
    }

    /// A jwt-bearer grant's assertion: the subject to issue a token for.
    pub fn grant(&mut self, assertion: &str) -> Result<String, Refusal> {
        let iss = jsonwebtoken::dangerous::insecure_decode::<Value>(assertion)
            .ok()
            .and_then(|d| d.claims["iss"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let Some(key) = self.issuers.get(&iss).cloned() else {
            self.refused.push(format!("unknown issuer {iss:?}"));
            return Err(("invalid_grant", "unknown issuer".into()));
        };
        let aud = self.grant_audience.clone();
        let claims = match self.check(assertion, &key, &aud, 3600) {
            Ok(c) => c,
            Err(e) => {
                self.refused.push(e.clone());
                return Err(("invalid_grant", e));
            }
        };
        if claims.get("scope").and_then(Value::as_str) != self.grant_scope.as_deref() {
            let e = format!("scope {:?}", claims.get("scope"));
            self.refused.push(e.clone());
            return Err(("invalid_scope", e));
        }
        let sub = claims["sub"].as_str().unwrap_or_default().to_owned();
        if self
            .allowed_subjects
            .as_ref()
            .is_some_and(|a| !a.contains(&sub))
        {
            self.refused.push(format!("subject {sub} not allowed"));
            let code = if self.refuse_with == "unauthorized_client" {
                "unauthorized_client"
            } else {
                "invalid_grant"
            };
            return Err((code, "not allowed".into()));
        }
        *self.exchanges.entry(sub.clone()).or_default() += 1;
        Ok(sub)
    }

    /// A token request's client authentication by private_key_jwt.
    /// `None`: the request carried no client assertion.
    pub fn client_assertion(
        &mut self,
        form: &HashMap<String, String>,
        token_url: &str,
    ) -> Option<Result<String, String>> {
        let assertion = form.get("client_assertion")?;
        Some(self.check_client(form, assertion, token_url))
    }

    fn check_client(
        &mut self,
        form: &HashMap<String, String>,
        assertion: &str,
        token_url: &str,
    ) -> Result<String, String> {
        let r = (|| {
            if form.get("client_assertion_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            {
                return Err("client_assertion_type".to_owned());
            }
            if form.contains_key("client_secret") {
                return Err("a client secret was sent too".to_owned());
            }
            let (client_id, key) = self.client.clone().ok_or("no client key registered")?;
            let c = self.check(assertion, &key, token_url, 300)?;
            if c["iss"] != client_id.as_str() || c["sub"] != client_id.as_str() {
                return Err(format!("iss/sub {} {}", c["iss"], c["sub"]));
            }
            let jti = c["jti"].as_str().ok_or("no jti")?.to_owned();
            if !self.seen_jti.insert(jti) {
                return Err("jti reused".to_owned());
            }
            Ok(client_id)
        })();
        if let Err(e) = &r {
            self.refused.push(format!("client assertion: {e}"));
        }
        r
    }
}

/// Signs a grant assertion as a client library would, for tests of the
/// verifier itself (and of what sidekey must refuse to accept).
pub fn sign(key: &TestKey, claims: &Value) -> String {
    let mut h = jsonwebtoken::Header::new(key.algorithm());
    h.kid = Some(key.kid.clone());
    let enc = match key.alg {
        "ES256" => jsonwebtoken::EncodingKey::from_ec_pem(key.private_pem.as_bytes()).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(key.private_pem.as_bytes()).unwrap(),
    };
    jsonwebtoken::encode(&h, claims, &enc).unwrap()
}
