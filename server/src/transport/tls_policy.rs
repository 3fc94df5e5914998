//! etcd's TLS knobs on top of rustls: `--cipher-suites` (Go's suite
//! names), `--tls-min-version`/`--tls-max-version`, certificate
//! revocation lists, and a client-certificate verifier that accepts a
//! client presenting exactly one of the trusted CA certificates (Go's
//! crypto/tls does; webpki refuses a CA certificate as an end entity).

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CipherSuite, DigitallySignedStruct, DistinguishedName, SignatureScheme, SupportedCipherSuite};

/// The TLS versions and TLS 1.2 suites a listener or dialer allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPolicy {
    /// Go cipher suite names; empty means rustls' defaults. Restricts TLS
    /// 1.2 only: like Go, TLS 1.3 suites are not configurable.
    pub cipher_suites: Vec<String>,
    /// Allow TLS 1.2 (`--tls-min-version TLS1.3` turns it off).
    pub allow_tls12: bool,
    /// Allow TLS 1.3 (`--tls-max-version TLS1.2` turns it off).
    pub allow_tls13: bool,
}

impl Default for TlsPolicy {
    fn default() -> Self {
        Self::permissive()
    }
}

impl TlsPolicy {
    pub fn permissive() -> Self {
        Self { cipher_suites: Vec::new(), allow_tls12: true, allow_tls13: true }
    }

    /// Validates etcd's flags.
    pub fn from_flags(cipher_suites: &str, min: &str, max: &str) -> Result<TlsPolicy, String> {
        let suites: Vec<String> =
            cipher_suites.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        for s in &suites {
            if !GO_SUITES.iter().any(|(name, _)| name == s) {
                return Err(format!("unexpected TLS cipher suite {s:?}"));
            }
        }
        let version = |flag: &str, v: &str| -> Result<Option<u8>, String> {
            match v {
                "" => Ok(None),
                "TLS1.2" => Ok(Some(2)),
                "TLS1.3" => Ok(Some(3)),
                "TLS1.0" | "TLS1.1" => Err(format!("--{flag} {v}: keel (rustls) supports TLS1.2 and TLS1.3 only")),
                other => Err(format!("--{flag} {other:?}: unknown TLS version (TLS1.2 or TLS1.3)")),
            }
        };
        let min = version("tls-min-version", min)?.unwrap_or(2);
        let max = version("tls-max-version", max)?.unwrap_or(3);
        if min > max {
            return Err("--tls-min-version is greater than --tls-max-version".into());
        }
        if !suites.is_empty() && min == 3 {
            return Err("--cipher-suites cannot be used with TLS1.3 only (its suites are not configurable)".into());
        }
        Ok(TlsPolicy { cipher_suites: suites, allow_tls12: min <= 2, allow_tls13: max >= 3 })
    }

    /// rustls' provider restricted to the configured TLS 1.2 suites.
    pub fn provider(&self) -> rustls::crypto::CryptoProvider {
        let mut provider = rustls::crypto::ring::default_provider();
        if !self.cipher_suites.is_empty() {
            let wanted: Vec<CipherSuite> = self
                .cipher_suites
                .iter()
                .filter_map(|name| GO_SUITES.iter().find(|(n, _)| n == name).and_then(|(_, s)| *s))
                .collect();
            provider.cipher_suites.retain(|s: &SupportedCipherSuite| match s {
                SupportedCipherSuite::Tls13(_) => true,
                SupportedCipherSuite::Tls12(_) => wanted.contains(&s.suite()),
            });
        }
        provider
    }

    pub fn versions(&self) -> Vec<&'static rustls::SupportedProtocolVersion> {
        let mut v = Vec::new();
        if self.allow_tls13 {
            v.push(&rustls::version::TLS13);
        }
        if self.allow_tls12 {
            v.push(&rustls::version::TLS12);
        }
        v
    }
}

/// Go's TLS 1.2 cipher suite names; `None` for suites Go knows and rustls
/// does not implement (CBC, RC4, 3DES): accepted, never negotiated.
const GO_SUITES: &[(&str, Option<CipherSuite>)] = &[
    ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", Some(CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)),
    ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", Some(CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384)),
    ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)),
    ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)),
    ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305", Some(CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256)),
    ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", Some(CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256)),
    ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305", Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)),
    ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)),
    ("TLS_RSA_WITH_RC4_128_SHA", None),
    ("TLS_RSA_WITH_3DES_EDE_CBC_SHA", None),
    ("TLS_RSA_WITH_AES_128_CBC_SHA", None),
    ("TLS_RSA_WITH_AES_256_CBC_SHA", None),
    ("TLS_RSA_WITH_AES_128_CBC_SHA256", None),
    ("TLS_RSA_WITH_AES_128_GCM_SHA256", None),
    ("TLS_RSA_WITH_AES_256_GCM_SHA384", None),
    ("TLS_ECDHE_ECDSA_WITH_RC4_128_SHA", None),
    ("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", None),
    ("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", None),
    ("TLS_ECDHE_RSA_WITH_RC4_128_SHA", None),
    ("TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA", None),
    ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", None),
    ("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", None),
    ("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", None),
    ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", None),
];

/// The revoked serial numbers in a file holding PEM lists or one DER
/// list. Like etcd's checkCRL, the lists' issuers and signatures are not
/// checked: the file is the operator's word.
fn revoked_serials(bytes: &[u8]) -> Result<HashSet<Vec<u8>>, String> {
    let mut ders = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(bytes) {
        match pem {
            Ok(pem) if pem.label == "X509 CRL" => ders.push(pem.contents),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    if ders.is_empty() {
        ders.push(bytes.to_vec());
    }
    let mut serials = HashSet::new();
    for der in &ders {
        let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| format!("not a revocation list: {e}"))?;
        serials.extend(crl.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()));
    }
    Ok(serials)
}

/// Serial numbers (DER integer contents) of revoked certificates.
type Serials = Arc<HashSet<Vec<u8>>>;

/// What identifies one version of a file without reading it: any write,
/// rename over it or change of its permissions changes one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    inode: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            len: m.len(),
            inode: m.ino(),
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Whether the file changed so recently that a second write within
    /// the file system's timestamp granularity could keep this stamp (as
    /// git's racy-index rule): such a version is read again next time.
    fn is_racy(&self) -> bool {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        now - self.modified.0.max(self.changed.0) < 2
    }
}

/// A revocation list file (`--client-crl-file`, `--peer-crl-file`). etcd
/// reads it again for every client, so an operator revokes a certificate
/// by rewriting the file, without a restart. Here the listener calls
/// [`RevocationList::refresh`] off the async workers before each TLS
/// handshake; it re-reads and parses the file only when its size, inode,
/// modification or change time differ from the last read (or that read
/// was of a file changed within the last two seconds). The handshake then
/// checks the parsed serials.
pub struct RevocationList {
    path: std::path::PathBuf,
    /// The file version last read, and its serials, or why it could not
    /// be read or parsed (then every client is refused, as in etcd).
    current: std::sync::Mutex<(Option<FileStamp>, Result<Serials, String>)>,
}

impl RevocationList {
    /// Reads the list; a file that cannot be read or parsed at start-up
    /// is a configuration error.
    pub fn open(path: &Path) -> std::io::Result<RevocationList> {
        let list = RevocationList {
            path: path.to_path_buf(),
            current: std::sync::Mutex::new((None, Err("not read yet".into()))),
        };
        list.refresh();
        if let Err(e) = &list.current().1 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())));
        }
        Ok(list)
    }

    fn current(&self) -> std::sync::MutexGuard<'_, (Option<FileStamp>, Result<Serials, String>)> {
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Re-reads the file if it changed since the last read. Blocking.
    pub fn refresh(&self) {
        let stamp = match FileStamp::of(&self.path) {
            Ok(stamp) => stamp,
            Err(e) => {
                *self.current() = (None, Err(e.to_string()));
                return;
            }
        };
        if self.current().0.as_ref() == Some(&stamp) {
            return;
        }
        let parsed = std::fs::read(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| revoked_serials(&bytes))
            .map(Arc::new);
        if let Err(error) = &parsed {
            tracing::warn!(path = %self.path.display(), %error, "cannot read the certificate revocation list");
        }
        let stamp = (!stamp.is_racy()).then_some(stamp);
        *self.current() = (stamp, parsed);
    }

    /// etcd's checkCRL: refused when the serial number of any certificate
    /// the client presented is listed, or when the list could not be read
    /// or parsed.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let serials =
            self.current().1.clone().map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
            })?;
        for cert in std::iter::once(end_entity).chain(intermediates) {
            let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
                .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
            if serials.contains(parsed.raw_serial()) {
                tracing::warn!(serial = %parsed.raw_serial_as_string(), "refused a revoked client certificate");
                return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
            }
        }
        Ok(())
    }

    /// Whether a client presenting `cert` alone passes the list as last
    /// refreshed.
    #[cfg(test)]
    pub fn admits(&self, cert: &CertificateDer<'_>) -> bool {
        self.check(cert, &[]).is_ok()
    }
}

/// Which client certificates a peer listener accepts beyond a valid
/// chain (`--peer-cert-allowed-cn`, `--peer-cert-allowed-hostname`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedClient {
    /// Any of these common names (etcd 3.6 takes a comma-separated list).
    CommonName(Vec<String>),
    Hostname(String),
}

impl AllowedClient {
    fn admits(&self, der: &[u8]) -> bool {
        match self {
            AllowedClient::CommonName(names) => super::common_name(der).is_some_and(|cn| names.contains(&cn)),
            AllowedClient::Hostname(host) => {
                let Ok(name) = rustls::pki_types::ServerName::try_from(host.as_str()) else {
                    return false;
                };
                let der = CertificateDer::from(der);
                rustls::server::ParsedCertificate::try_from(&der)
                    .and_then(|cert| rustls::client::verify_server_name(&cert, &name))
                    .is_ok()
            }
        }
    }
}

/// webpki's client verifier, except that a client presenting exactly a
/// trusted CA certificate is accepted (its key is still proven by the
/// handshake signature), revoked certificates are refused
/// ([`RevocationList`]), and, with `allowed`, a certificate with another common name or
/// host name is refused in the handshake (the client sees Go's "bad
/// certificate" alert, as from etcd).
pub struct RootAsClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    crl: Option<Arc<RevocationList>>,
    roots: Vec<CertificateDer<'static>>,
    allowed: Option<AllowedClient>,
}

impl RootAsClientVerifier {
    /// `store` holds `roots`, the trusted CA certificates.
    pub fn new(
        store: Arc<rustls::RootCertStore>,
        roots: Vec<CertificateDer<'static>>,
        crl: Option<Arc<RevocationList>>,
        allowed: Option<AllowedClient>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> std::io::Result<RootAsClientVerifier> {
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(store, provider)
            .build()
            .map_err(std::io::Error::other)?;
        Ok(RootAsClientVerifier { inner, crl, roots, allowed })
    }
}

impl fmt::Debug for RootAsClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootAsClientVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for RootAsClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        use rustls::CertificateError::*;
        if let Some(crl) = &self.crl {
            crl.check(end_entity, intermediates)?;
        }
        let verified = match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Ok(v) => v,
            // Expired or not yet valid stays refused.
            Err(
                e @ rustls::Error::InvalidCertificate(
                    Expired | ExpiredContext { .. } | NotValidYet | NotValidYetContext { .. },
                ),
            ) => return Err(e),
            Err(_) if self.roots.iter().any(|r| r.as_ref() == end_entity.as_ref()) => ClientCertVerified::assertion(),
            Err(e) => return Err(e),
        };
        if let Some(allowed) = &self.allowed {
            if !allowed.admits(end_entity.as_ref()) {
                let cn = super::common_name(end_entity.as_ref());
                tracing::warn!(common_name = ?cn, allowed = ?allowed, "client certificate authentication failed");
                return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The dialing side of `--peer-cert-allowed-cn`/`-hostname`: as in etcd
/// (whose check is on both ends of a peer link), a peer whose server
/// certificate does not name what is allowed is refused.
pub struct AllowedServerVerifier {
    pub inner: Arc<rustls::client::WebPkiServerVerifier>,
    pub allowed: AllowedClient,
}

impl fmt::Debug for AllowedServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AllowedServerVerifier").field("allowed", &self.allowed).finish_non_exhaustive()
    }
}

impl rustls::client::danger::ServerCertVerifier for AllowedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        if !self.allowed.admits(end_entity.as_ref()) {
            let cn = super::common_name(end_entity.as_ref());
            tracing::warn!(common_name = ?cn, allowed = ?self.allowed, "client certificate authentication failed");
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_validated_like_etcd() {
        assert_eq!(TlsPolicy::from_flags("", "TLS1.2", ""), Ok(TlsPolicy::permissive()));
        let p = TlsPolicy::from_flags("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "", "TLS1.2");
        assert!(p.as_ref().is_ok_and(|p| p.allow_tls12 && !p.allow_tls13));
        assert!(TlsPolicy::from_flags("TLS_BOGUS", "", "").is_err());
        assert!(TlsPolicy::from_flags("", "TLS1.3", "TLS1.2").is_err());
        assert!(TlsPolicy::from_flags("", "TLS1.1", "").is_err());
    }

    #[test]
    fn cipher_suites_restrict_tls12_only() {
        let p = TlsPolicy::from_flags("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "", "").unwrap_or_default();
        let suites: Vec<CipherSuite> = p.provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert!(suites.contains(&CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256));
        assert!(!suites.contains(&CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384));
        assert!(suites.contains(&CipherSuite::TLS13_AES_128_GCM_SHA256));
    }
}
