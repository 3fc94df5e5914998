//! ES512 JWTs (ECDSA on P-521 with SHA-512), which etcd accepts as a
//! `sign-method` and jsonwebtoken's ring backend cannot sign or verify.
//! The token is the compact JWS form golang-jwt writes: base64url header
//! and claims, and a 132-byte `r || s` signature.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p521::ecdsa::signature::{Signer, Verifier};
use p521::ecdsa::{Signature, SigningKey, VerifyingKey};
use p521::pkcs8::{DecodePrivateKey, DecodePublicKey};
use serde::de::DeserializeOwned;
use serde::Serialize;

const HEADER: &str = r#"{"alg":"ES512","typ":"JWT"}"#;

/// A private key from PEM: SEC1 ("EC PRIVATE KEY") or PKCS#8, as
/// golang-jwt's ParseECPrivateKeyFromPEM accepts.
pub fn signing_key(pem: &[u8]) -> Result<SigningKey, String> {
    let pem = std::str::from_utf8(pem).map_err(|e| e.to_string())?;
    let secret = match p521::SecretKey::from_sec1_pem(pem) {
        Ok(secret) => secret,
        Err(_) => p521::SecretKey::from_pkcs8_pem(pem).map_err(|e| format!("not a P-521 private key: {e}"))?,
    };
    SigningKey::from_bytes(&secret.to_bytes()).map_err(|e| e.to_string())
}

/// A public key from PEM ("PUBLIC KEY").
pub fn verifying_key_from_pem(pem: &[u8]) -> Result<VerifyingKey, String> {
    let pem = std::str::from_utf8(pem).map_err(|e| e.to_string())?;
    let public = p521::PublicKey::from_public_key_pem(pem).map_err(|e| format!("not a P-521 public key: {e}"))?;
    VerifyingKey::from_affine(*public.as_affine()).map_err(|e| e.to_string())
}

/// A public key from the encoded point of a certificate's key.
pub fn verifying_key_from_point(point: &[u8]) -> Result<VerifyingKey, String> {
    VerifyingKey::from_sec1_bytes(point).map_err(|e| e.to_string())
}

pub fn sign<C: Serialize>(key: &SigningKey, claims: &C) -> Result<String, serde_json::Error> {
    let mut token = URL_SAFE_NO_PAD.encode(HEADER);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?));
    let signature: Signature = key.sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    Ok(token)
}

/// The claims of a token whose header names ES512 and whose signature
/// `key` made; `None` for anything else.
pub fn verify<C: DeserializeOwned>(key: &VerifyingKey, token: &str) -> Option<C> {
    let (signed, signature) = token.rsplit_once('.')?;
    let (header, claims) = signed.split_once('.')?;
    let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    if header.get("alg")?.as_str()? != "ES512" {
        return None;
    }
    let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).ok()?).ok()?;
    key.verify(signed.as_bytes(), &signature).ok()?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).ok()?).ok()
}
