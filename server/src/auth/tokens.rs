//! Auth tokens (`--auth-token`): etcd's simple tokens and JWTs.
//!
//! A simple token is `<16 random letters>.<log index>`: the proposing
//! member picks the letters, every member registers the token when it
//! applies the Authenticate entry at that index, and a member asked about
//! a token first waits until it has applied that index. Simple tokens
//! live only in memory, expire after `--auth-token-ttl` seconds without
//! use, and die with their user's deletion or password change, or when
//! auth is disabled.
//!
//! A JWT carries the user name and the auth revision it was issued at,
//! signed with the configured key; any member holding the key verifies it
//! without shared state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Who a valid token names, and (JWT only) the auth revision it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub username: String,
    /// Set by JWTs; simple tokens are checked against the current
    /// revision instead.
    pub revision: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenConfigError {
    #[error(
        "invalid auth token option {0:?} (want 'simple' or 'jwt,sign-method=...,pub-key=...,priv-key=...,ttl=...')"
    )]
    Options(String),
    #[error("unknown auth token type {0:?}")]
    UnknownType(String),
    #[error("invalid JWT sign-method {0:?}")]
    SignMethod(String),
    #[error("JWT option ttl={0:?} is not a duration")]
    Ttl(String),
    #[error("JWT {0}: {1}")]
    Key(&'static str, String),
    #[error("JWT needs priv-key (to sign) or pub-key (to verify)")]
    MissingKey,
}

pub enum TokenProvider {
    Simple(SimpleTokens),
    Jwt(Arc<JwtTokens>),
}

/// `--auth-token` parsed, with JWT keys already read and checked: the
/// configuration holds it, and each member start makes its
/// [`TokenProvider`] from it without touching the key files again.
#[derive(Clone)]
pub enum TokenSpec {
    Simple {
        ttl: Duration,
    },
    /// Keys are immutable once loaded, so starts share them.
    Jwt(Arc<JwtTokens>),
}

impl std::fmt::Debug for TokenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSpec::Simple { ttl } => f.debug_struct("Simple").field("ttl", ttl).finish(),
            TokenSpec::Jwt(jwt) => f.debug_struct("Jwt").field("ttl", &jwt.ttl).finish_non_exhaustive(),
        }
    }
}

impl TokenSpec {
    /// Parses `--auth-token` as etcd does: a type, then `name=value`
    /// options separated by commas; reads the JWT key files.
    pub fn from_flag(flag: &str, simple_ttl: Duration) -> Result<TokenSpec, TokenConfigError> {
        let mut parts = flag.split(',');
        let kind = parts.next().unwrap_or_default();
        let mut opts: HashMap<&str, &str> = HashMap::new();
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                return Err(TokenConfigError::Options(flag.to_string()));
            };
            if opts.insert(k, v).is_some() {
                return Err(TokenConfigError::Options(flag.to_string()));
            }
        }
        match kind {
            "simple" => Ok(TokenSpec::Simple { ttl: simple_ttl }),
            "jwt" => Ok(TokenSpec::Jwt(Arc::new(JwtTokens::new(&opts)?))),
            other => Err(TokenConfigError::UnknownType(other.to_string())),
        }
    }

    /// A fresh provider: simple tokens start empty, as after a restart.
    pub fn provider(&self) -> TokenProvider {
        match self {
            TokenSpec::Simple { ttl } => TokenProvider::Simple(SimpleTokens::new(*ttl)),
            TokenSpec::Jwt(jwt) => TokenProvider::Jwt(jwt.clone()),
        }
    }
}

impl TokenProvider {
    /// [`TokenSpec::from_flag`], then its provider (tests' shorthand).
    #[cfg(test)]
    pub fn from_flag(flag: &str, simple_ttl: Duration) -> Result<TokenProvider, TokenConfigError> {
        TokenSpec::from_flag(flag, simple_ttl).map(|spec| spec.provider())
    }

    pub fn simple_tokens(&self) -> Option<&SimpleTokens> {
        match self {
            TokenProvider::Simple(s) => Some(s),
            TokenProvider::Jwt(_) => None,
        }
    }
}

/// The random part of a simple token (etcd: 16 ASCII letters).
pub fn simple_token_prefix() -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    (0..16).map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char).collect()
}

/// The log index a simple token was issued at, if it is well formed.
pub fn simple_token_index(token: &str) -> Option<u64> {
    let (prefix, index) = token.rsplit_once('.')?;
    if prefix.is_empty() {
        return None;
    }
    index.parse().ok()
}

struct SimpleToken {
    username: String,
    expires: Instant,
}

pub struct SimpleTokens {
    ttl: Duration,
    tokens: Mutex<HashMap<String, SimpleToken>>,
}

impl SimpleTokens {
    fn new(ttl: Duration) -> Self {
        Self { ttl, tokens: Mutex::new(HashMap::new()) }
    }

    /// Registers a token issued by an applied Authenticate entry.
    pub fn assign(&self, token: &str, username: &str) {
        let now = Instant::now();
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.retain(|_, t| t.expires > now);
            tokens.insert(token.to_string(), SimpleToken { username: username.to_string(), expires: now + self.ttl });
        }
    }

    /// The user of a live token; using it extends its life.
    pub fn lookup(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let mut tokens = self.tokens.lock().ok()?;
        match tokens.get_mut(token) {
            Some(t) if t.expires > now => {
                t.expires = now + self.ttl;
                Some(t.username.clone())
            }
            Some(_) => {
                tokens.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn invalidate_user(&self, username: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.retain(|_, t| t.username != username);
        }
    }

    pub fn clear(&self) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.clear();
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

pub struct JwtTokens {
    keys: JwtKeys,
    ttl: Duration,
}

enum JwtKeys {
    /// What jsonwebtoken implements (HS, RS, PS, ES256/384, EdDSA).
    Jsonwebtoken { algorithm: Algorithm, signing: Option<EncodingKey>, verifying: DecodingKey },
    /// Boxed: P-521 keys are several hundred bytes.
    Es512 { signing: Option<Box<p521::ecdsa::SigningKey>>, verifying: Box<p521::ecdsa::VerifyingKey> },
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Jwt(#[from] jsonwebtoken::errors::Error),
    #[error(transparent)]
    Claims(#[from] serde_json::Error),
}

fn read_key(option: &'static str, path: &str) -> Result<Vec<u8>, TokenConfigError> {
    std::fs::read(path).map_err(|e| TokenConfigError::Key(option, format!("{path}: {e}")))
}

/// Whether a `pub-key` file holds a certificate rather than a key.
fn is_certificate(pem: &[u8]) -> bool {
    pem.starts_with(b"-----BEGIN CERTIFICATE")
}

/// The public key in a PEM certificate, as the DER jsonwebtoken wants
/// (PKCS#1 for RSA, the encoded point for ECDSA).
fn certificate_public_key(pem: &[u8]) -> Result<Vec<u8>, TokenConfigError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| TokenConfigError::Key("pub-key", e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| TokenConfigError::Key("pub-key", e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

impl JwtTokens {
    fn new(opts: &HashMap<&str, &str>) -> Result<JwtTokens, TokenConfigError> {
        let method = opts.get("sign-method").copied().unwrap_or_default();
        let ttl = match opts.get("ttl") {
            Some(t) => crate::go_duration::parse_go_duration(t).map_err(|_| TokenConfigError::Ttl(t.to_string()))?,
            None => Duration::from_secs(300),
        };
        for k in opts.keys() {
            if !["sign-method", "ttl", "pub-key", "priv-key"].contains(k) {
                tracing::warn!(option = k, "unknown JWT option");
            }
        }
        let private = opts.get("priv-key").map(|p| read_key("priv-key", p)).transpose()?;
        let public = opts.get("pub-key").map(|p| read_key("pub-key", p)).transpose()?;
        if method == "ES512" {
            let bad = |which: &'static str| move |e: String| TokenConfigError::Key(which, e);
            let signing = private.as_deref().map(super::es512::signing_key).transpose().map_err(bad("priv-key"))?;
            // As etcd: a private key verifies with its own public half; a
            // public key alone only verifies.
            let verifying = match (&signing, &public) {
                (Some(key), _) => Ok(p521::ecdsa::VerifyingKey::from(key)),
                (None, Some(p)) if is_certificate(p) => {
                    super::es512::verifying_key_from_point(&certificate_public_key(p)?)
                }
                (None, Some(p)) => super::es512::verifying_key_from_pem(p),
                (None, None) => return Err(TokenConfigError::MissingKey),
            }
            .map_err(bad("pub-key"))?;
            let keys = JwtKeys::Es512 { signing: signing.map(Box::new), verifying: Box::new(verifying) };
            return Ok(JwtTokens { keys, ttl });
        }
        let algorithm: Algorithm = method.parse().map_err(|_| TokenConfigError::SignMethod(method.to_string()))?;
        let bad =
            |which: &'static str| move |e: jsonwebtoken::errors::Error| TokenConfigError::Key(which, e.to_string());
        use Algorithm::*;
        let (signing, verifying) = match algorithm {
            HS256 | HS384 | HS512 => {
                let secret = private.ok_or(TokenConfigError::MissingKey)?;
                (Some(EncodingKey::from_secret(&secret)), DecodingKey::from_secret(&secret))
            }
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
                let signing = private.as_deref().map(EncodingKey::from_rsa_pem).transpose().map_err(bad("priv-key"))?;
                let verifying = match &public {
                    Some(p) if is_certificate(p) => DecodingKey::from_rsa_der(&certificate_public_key(p)?),
                    Some(p) => DecodingKey::from_rsa_pem(p).map_err(bad("pub-key"))?,
                    None => return Err(TokenConfigError::Key("pub-key", "needed to verify RSA tokens".into())),
                };
                (signing, verifying)
            }
            ES256 | ES384 => {
                let signing = private.as_deref().map(EncodingKey::from_ec_pem).transpose().map_err(bad("priv-key"))?;
                let verifying = match &public {
                    Some(p) if is_certificate(p) => DecodingKey::from_ec_der(&certificate_public_key(p)?),
                    Some(p) => DecodingKey::from_ec_pem(p).map_err(bad("pub-key"))?,
                    None => return Err(TokenConfigError::Key("pub-key", "needed to verify ECDSA tokens".into())),
                };
                (signing, verifying)
            }
            EdDSA => {
                let signing = private.as_deref().map(EncodingKey::from_ed_pem).transpose().map_err(bad("priv-key"))?;
                let verifying = match &public {
                    Some(p) => DecodingKey::from_ed_pem(p).map_err(bad("pub-key"))?,
                    None => return Err(TokenConfigError::MissingKey),
                };
                (signing, verifying)
            }
        };
        Ok(JwtTokens { keys: JwtKeys::Jsonwebtoken { algorithm, signing, verifying }, ttl })
    }

    /// Signs a token for `username` at auth revision `revision`; `None`
    /// when only a public key was configured (etcd's verify-only mode).
    pub fn sign(&self, username: &str, revision: u64) -> Option<Result<String, SignError>> {
        let claims =
            Claims { username: username.to_string(), revision, exp: now_secs().saturating_add(self.ttl.as_secs()) };
        match &self.keys {
            JwtKeys::Jsonwebtoken { algorithm, signing, .. } => Some(
                jsonwebtoken::encode(&Header::new(*algorithm), &claims, signing.as_ref()?).map_err(SignError::from),
            ),
            JwtKeys::Es512 { signing, .. } => {
                Some(super::es512::sign(signing.as_ref()?, &claims).map_err(SignError::from))
            }
        }
    }

    pub fn verify(&self, token: &str) -> Option<TokenInfo> {
        let claims: Claims = match &self.keys {
            JwtKeys::Jsonwebtoken { algorithm, verifying, .. } => {
                let mut validation = Validation::new(*algorithm);
                validation.leeway = 0;
                jsonwebtoken::decode::<Claims>(token, verifying, &validation).ok()?.claims
            }
            JwtKeys::Es512 { verifying, .. } => {
                let claims: Claims = super::es512::verify(verifying, token)?;
                // As jsonwebtoken with no leeway: expired once `exp` is past.
                if claims.exp < now_secs() {
                    return None;
                }
                claims
            }
        };
        Some(TokenInfo { username: claims.username, revision: Some(claims.revision) })
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_ttl_refuses_a_duration_without_unit() {
        assert!(matches!(
            TokenProvider::from_flag("jwt,sign-method=HS256,ttl=5", Duration::from_secs(1)),
            Err(TokenConfigError::Ttl(_))
        ));
    }

    #[test]
    fn simple_tokens_expire_and_die_with_their_user() {
        let t = SimpleTokens::new(Duration::from_secs(60));
        t.assign("abc.5", "alice");
        t.assign("def.6", "bob");
        assert_eq!(t.lookup("abc.5").as_deref(), Some("alice"));
        t.invalidate_user("alice");
        assert_eq!(t.lookup("abc.5"), None);
        assert_eq!(t.lookup("def.6").as_deref(), Some("bob"));
        let short = SimpleTokens::new(Duration::ZERO);
        short.assign("x.1", "carol");
        assert_eq!(short.lookup("x.1"), None);
        assert_eq!(simple_token_index("abcdef.42"), Some(42));
        assert_eq!(simple_token_index("nodot"), None);
        assert_eq!(simple_token_index(".3"), None);
    }

    #[test]
    fn flag_parsing_rejects_malformed_options() {
        assert!(matches!(TokenProvider::from_flag("simple", Duration::from_secs(1)), Ok(TokenProvider::Simple(_))));
        assert!(matches!(
            TokenProvider::from_flag("bogus", Duration::from_secs(1)),
            Err(TokenConfigError::UnknownType(_))
        ));
        assert!(matches!(
            TokenProvider::from_flag("jwt,ttl", Duration::from_secs(1)),
            Err(TokenConfigError::Options(_))
        ));
        assert!(matches!(
            TokenProvider::from_flag("jwt,sign-method=XX256", Duration::from_secs(1)),
            Err(TokenConfigError::SignMethod(_))
        ));
    }

    #[test]
    fn hmac_tokens_round_trip_and_reject_tampering() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"not-so-secret")?;
        let flag = format!("jwt,sign-method=HS256,priv-key={},ttl=1m", secret.display());
        let TokenProvider::Jwt(jwt) = TokenProvider::from_flag(&flag, Duration::from_secs(1))? else {
            return Err("expected a JWT provider".into());
        };
        let token = jwt.sign("alice", 7).ok_or("no signing key")??;
        assert_eq!(jwt.verify(&token), Some(TokenInfo { username: "alice".into(), revision: Some(7) }));
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(jwt.verify(&tampered), None);
        Ok(())
    }
}

#[cfg(test)]
mod es512_tests {
    use super::*;

    /// A P-521 key pair as `openssl ecparam -name secp521r1 -genkey`
    /// writes it, and its public key as `openssl ec -pubout` does.
    fn key_files(dir: &std::path::Path) -> Result<(String, String), Box<dyn std::error::Error>> {
        use p521::pkcs8::{EncodePublicKey, LineEnding};
        let secret = p521::SecretKey::random(&mut p521::elliptic_curve::rand_core::OsRng);
        let private = dir.join("es512.key");
        std::fs::write(&private, secret.to_sec1_pem(LineEnding::LF)?.as_bytes())?;
        let public = dir.join("es512.pub");
        std::fs::write(&public, secret.public_key().to_public_key_pem(LineEnding::LF)?)?;
        Ok((private.display().to_string(), public.display().to_string()))
    }

    #[test]
    fn es512_tokens_round_trip_and_reject_tampering_and_other_keys() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (private, public) = key_files(dir.path())?;
        let flag = format!("jwt,sign-method=ES512,priv-key={private},pub-key={public},ttl=1m");
        let TokenProvider::Jwt(jwt) = TokenProvider::from_flag(&flag, Duration::from_secs(1))? else {
            return Err("expected a JWT provider".into());
        };
        let token = jwt.sign("alice", 7).ok_or("no signing key")??;
        assert_eq!(token.split('.').count(), 3);
        assert_eq!(jwt.verify(&token), Some(TokenInfo { username: "alice".into(), revision: Some(7) }));

        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(jwt.verify(&tampered), None);

        // Verify-only with the public key; another key pair's tokens fail.
        let verify_only = format!("jwt,sign-method=ES512,pub-key={public}");
        let TokenProvider::Jwt(verifier) = TokenProvider::from_flag(&verify_only, Duration::from_secs(1))? else {
            return Err("expected a JWT provider".into());
        };
        assert!(verifier.sign("alice", 7).is_none());
        assert_eq!(verifier.verify(&token).map(|i| i.username), Some("alice".to_string()));
        let other = tempfile::tempdir()?;
        let (other_private, other_public) = key_files(other.path())?;
        let flag = format!("jwt,sign-method=ES512,priv-key={other_private},pub-key={other_public}");
        let TokenProvider::Jwt(other) = TokenProvider::from_flag(&flag, Duration::from_secs(1))? else {
            return Err("expected a JWT provider".into());
        };
        assert_eq!(other.verify(&token), None);

        // A private key alone signs and verifies, as in etcd.
        let private_only = format!("jwt,sign-method=ES512,priv-key={private}");
        let TokenProvider::Jwt(private_only) = TokenProvider::from_flag(&private_only, Duration::from_secs(1))? else {
            return Err("expected a JWT provider".into());
        };
        let own = private_only.sign("bob", 8).ok_or("no signing key")??;
        assert_eq!(private_only.verify(&own).map(|i| i.username), Some("bob".to_string()));
        assert_eq!(private_only.verify(&token).map(|i| i.username), Some("alice".to_string()));

        // An expired token is refused.
        let stale = super::super::es512::sign(
            &super::super::es512::signing_key(&std::fs::read(&private)?)?,
            &Claims { username: "alice".into(), revision: 7, exp: now_secs() - 1 },
        )?;
        assert_eq!(jwt.verify(&stale), None);
        Ok(())
    }
}
