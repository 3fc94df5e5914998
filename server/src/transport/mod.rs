//! Sockets and TLS for both the client and the peer URLs: binding
//! `http(s)://host:port` and `unix(s)://path` listeners, serving an HTTP
//! router (gRPC and plain HTTP on one port, HTTP/1.1 and HTTP/2) with or
//! without TLS, and dialing peers.
//!
//! Auto TLS (`--auto-tls`, `--peer-auto-tls`) generates a self-signed
//! certificate under `<data-dir>/fixtures/`, and peers dialed with it do not
//! verify certificates, as etcd does.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::tasks::MemberTasks;
use tonic::transport::{Channel, Endpoint};

pub mod h2_authority;
pub mod tls_policy;

pub use tls_policy::TlsPolicy;

/// Where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// Splits a validated URL into scheme security and address.
pub fn parse_address(url: &str) -> io::Result<(bool, Address)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad URL {url}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let secure = matches!(scheme, "https" | "unixs");
    match scheme {
        "http" | "https" => {
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            Ok((secure, Address::Tcp { host, port: port.parse().map_err(|_| bad())? }))
        }
        "unix" | "unixs" => Ok((secure, Address::Unix(PathBuf::from(rest)))),
        _ => Err(bad()),
    }
}

async fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    // Like Go's resolver for "localhost": prefer IPv4.
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs.into_iter().next().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {host}")))
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Binds the socket a URL names.
pub async fn bind(url: &str) -> io::Result<Listener> {
    match parse_address(url)?.1 {
        Address::Tcp { host, port } => {
            let addr = resolve(&host, port).await?;
            let socket =
                if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            Ok(Listener::Tcp(socket.listen(1024)?))
        }
        Address::Unix(path) => {
            if path.exists() {
                std::fs::remove_file(&path)?;
            }
            Ok(Listener::Unix(UnixListener::bind(&path)?, path))
        }
    }
}

impl Listener {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connection of any kind keel speaks over.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<Stream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<Stream>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::ServerTls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Stream::ClientTls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = delegate!(self, s => s.poll_read(cx, buf));
        if buf.filled().len() > before {
            crate::busy_poll::note_read_with_data();
        }
        read
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// The common name of a connection's verified client certificate. The
/// server puts it in every request's extensions (etcd's CN auth reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCommonName(pub String);

/// The subject common name of a DER certificate.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// HTTP/2 limits applied to every served connection.
#[derive(Debug, Clone, Copy)]
pub struct Http2Options {
    pub max_concurrent_streams: u32,
    /// Clients pinging more often than this are cut off (zero: never).
    pub keepalive_min_time: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Passes client connections through `h2_authority` (repairs grpc-go's
    /// URL authorities, enforces `keepalive_min_time`). Peers are keel
    /// members, which need neither.
    pub authority_shim: bool,
}

/// The TLS side of a listener: the acceptor, and the revocation list its
/// client verifier checks, refreshed before each handshake.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    revocations: Option<Arc<tls_policy::RevocationList>>,
}

impl ServerTls {
    pub async fn accept<IO>(&self, stream: IO) -> io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        if let Some(list) = &self.revocations {
            // A stat, and a read and parse when the file changed: blocking
            // work, kept off the async workers.
            let list = list.clone();
            tokio::task::spawn_blocking(move || list.refresh()).await.map_err(io::Error::other)?;
        }
        self.acceptor.accept(stream).await
    }
}

/// What a listener accepts.
#[derive(Clone)]
pub enum Security {
    Plain,
    Tls(ServerTls),
    /// Both on one port (etcd's `http://` and `https://` URLs for the same
    /// address): a TLS handshake is told apart by its first byte.
    Both(ServerTls),
}

/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

/// The first byte a TCP client sent, without consuming it. Unix sockets
/// cannot be peeked here; they are taken to speak TLS.
async fn peek_first_byte(stream: &Stream) -> io::Result<Option<u8>> {
    match stream {
        Stream::Tcp(s) => {
            let mut b = [0u8; 1];
            let n = s.peek(&mut b).await?;
            Ok((n == 1).then_some(b[0]))
        }
        _ => Ok(Some(TLS_HANDSHAKE)),
    }
}

/// Accepts connections until the member stops, serving `router` on each;
/// each connection is one of the member's tasks, closed gracefully (for
/// up to a second) when the member stops.
pub async fn serve(
    listener: Listener,
    security: Security,
    router: axum::Router,
    opts: Http2Options,
    tasks: MemberTasks,
) {
    loop {
        let stream = tokio::select! {
            s = listener.accept() => s,
            _ = tasks.stopped() => return,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let connection = serve_connection(stream, security.clone(), router.clone(), opts, tasks.stop_signal());
        tasks.spawn(connection);
    }
}

/// The TLS handshake, if any, then HTTP/1 or HTTP/2 until the client
/// leaves or `stop` fires.
async fn serve_connection(
    stream: Stream,
    security: Security,
    router: axum::Router,
    opts: Http2Options,
    stop: tokio_util::sync::CancellationToken,
) {
    // A client that never completes its handshake is dropped when the
    // member stops rather than holding up shutdown.
    let Some(Some((stream, router))) = stop.run_until_cancelled(handshake(stream, security, router)).await else {
        return;
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    {
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new());
        h2.max_concurrent_streams(opts.max_concurrent_streams);
        if !opts.keepalive_interval.is_zero() {
            h2.keep_alive_interval(Some(opts.keepalive_interval));
            h2.keep_alive_timeout(opts.keepalive_timeout);
        }
    }
    let service = TowerToHyperService::new(router);
    if opts.authority_shim {
        let stream = h2_authority::AuthorityFix::new(stream, opts.keepalive_min_time);
        drive(builder.serve_connection_with_upgrades(TokioIo::new(stream), service), stop).await;
    } else {
        drive(builder.serve_connection_with_upgrades(TokioIo::new(stream), service), stop).await;
    }
}

/// Tells TLS from plain text and completes a TLS handshake: the stream to
/// serve and the router (told the client certificate's common name), or
/// None when the client is refused or leaves.
async fn handshake(stream: Stream, security: Security, mut router: axum::Router) -> Option<(Stream, axum::Router)> {
    let tls = match security {
        Security::Plain => None,
        Security::Tls(tls) => Some(tls),
        Security::Both(tls) => match peek_first_byte(&stream).await {
            Ok(Some(TLS_HANDSHAKE)) => Some(tls),
            Ok(_) => None,
            Err(_) => return None,
        },
    };
    let Some(tls) = tls else {
        return Some((stream, router));
    };
    match tls.accept(stream).await {
        Ok(s) => {
            let cn = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| common_name(c));
            if let Some(cn) = cn {
                router = router.layer(axum::Extension(ClientCommonName(cn)));
            }
            Some((Stream::ServerTls(Box::new(s)), router))
        }
        Err(e) => {
            let refused = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate)));
            if refused {
                // Go's wording, which operators' scripts look for.
                tracing::warn!("TLS handshake error: remote error: tls: bad certificate");
            } else {
                tracing::debug!(error = %e, "TLS handshake failed");
            }
            None
        }
    }
}

/// Runs a connection until it ends, or closes it gracefully (for up to a
/// second) once `stop` fires.
async fn drive<C>(conn: C, stop: tokio_util::sync::CancellationToken)
where
    C: hyper_util::server::graceful::GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::trace!(error = %e, "connection closed with error");
            }
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

/// Certificates and keys of a TLS endpoint.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that signs acceptable client certificates; when set, clients
    /// must present one (etcd requires them whenever a trusted CA is given).
    pub trusted_ca: Option<PathBuf>,
    /// Revoked client certificates (`--client-crl-file`, `--peer-crl-file`).
    pub crl: Option<PathBuf>,
    pub policy: TlsPolicy,
    /// What client certificates must name (`--peer-cert-allowed-cn`,
    /// `--peer-cert-allowed-hostname`).
    pub allowed_client: Option<tls_policy::AllowedClient>,
}

/// Creates (once) a self-signed certificate for `hosts` under `dir`,
/// served with `policy`.
pub fn self_signed(dir: &Path, hosts: &[String], policy: &TlsPolicy) -> io::Result<TlsFiles> {
    let files =
        TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem"), policy: policy.clone(), ..Default::default() };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir)?;
    let mut names: Vec<String> = hosts.to_vec();
    if names.is_empty() {
        names.push("localhost".into());
    }
    let ck = rcgen::generate_simple_self_signed(names).map_err(io::Error::other)?;
    std::fs::write(&files.cert, ck.cert.pem())?;
    std::fs::write(&files.key, ck.signing_key.serialize_pem())?;
    Ok(files)
}

fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

fn load_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

fn root_store(ca: &Path) -> io::Result<Arc<rustls::RootCertStore>> {
    root_store_of(ca, &load_certs(ca)?)
}

/// The store of `certs`, read from `ca`.
fn root_store_of(ca: &Path, certs: &[CertificateDer<'static>]) -> io::Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

/// A TLS server configuration speaking h2 and http/1.1; with a trusted
/// CA it requires and verifies client certificates.
pub fn server_tls(files: &TlsFiles) -> io::Result<ServerTls> {
    let provider = Arc::new(files.policy.provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&files.policy.versions())
        .map_err(io::Error::other)?;
    let mut revocations = None;
    let builder = match &files.trusted_ca {
        Some(ca) => {
            let certs = load_certs(ca)?;
            revocations = files.crl.as_deref().map(tls_policy::RevocationList::open).transpose()?.map(Arc::new);
            let verifier = tls_policy::RootAsClientVerifier::new(
                root_store_of(ca, &certs)?,
                certs,
                revocations.clone(),
                files.allowed_client.clone(),
                provider,
            )?;
            builder.with_client_cert_verifier(Arc::new(verifier))
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg =
        builder.with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?).map_err(io::Error::other)?;
    if revocations.is_some() {
        // A resumed session skips certificate verification, so a client
        // revoked since its first handshake would get back in.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
    }
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(ServerTls { acceptor: TlsAcceptor::from(Arc::new(cfg)), revocations })
}

/// How a member dials its peers over TLS, as etcd 3.4's
/// `TLSInfo.ClientConfig`: with `--peer-trusted-ca-file` the server must
/// chain to that CA (and name what `--peer-cert-allowed-cn`/`-hostname`
/// allow); with certificate files and no CA, to the system's roots; with
/// `--peer-auto-tls` alone nothing is verified. `--cipher-suites` and the
/// TLS version flags apply to these dials as to what keel serves.
pub fn peer_client_tls(files: Option<&TlsFiles>, policy: &TlsPolicy) -> io::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(policy.provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&policy.versions())
        .map_err(io::Error::other)?;
    let builder = match files {
        None => builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider))),
        Some(files) => {
            let roots = match &files.trusted_ca {
                Some(ca) => root_store(ca)?,
                None => system_roots()?,
            };
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(io::Error::other)?;
            match files.allowed_client.clone() {
                Some(allowed) => builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(tls_policy::AllowedServerVerifier { inner, allowed })),
                None => builder.with_webpki_verifier(inner),
            }
        }
    };
    let mut cfg = match files {
        Some(files) => {
            builder.with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?).map_err(io::Error::other)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The operating system's trusted roots (what Go's crypto/tls uses when
/// no CA file is given).
fn system_roots() -> io::Result<Arc<rustls::RootCertStore>> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(%error, "cannot load a system root certificate");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        // Go would start and fail every dial; refusing to start says why.
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no --peer-trusted-ca-file and no system root certificates to verify peers with",
        ));
    }
    Ok(Arc::new(roots))
}

/// Accepts any server certificate: what etcd's auto TLS does between peers.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Dials peers: plain TCP, Unix sockets, or TLS with the given client
/// configuration for https/unixs URLs.
#[derive(Clone)]
pub struct PeerConnector {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// This member's own peer address when it is a loopback address: the
    /// source of its connections to peers on loopback, so a peer (or a
    /// fault-injecting proxy in front of it) can tell members apart on one
    /// host. Elsewhere the kernel picks the source, as for etcd.
    pub loopback_source: Option<std::net::IpAddr>,
}

/// The loopback address among `listen_peer_urls`, if any (see
/// [`PeerConnector::loopback_source`]).
pub fn loopback_source(listen_peer_urls: &[String]) -> Option<std::net::IpAddr> {
    listen_peer_urls.iter().find_map(|url| match parse_address(url) {
        Ok((_, Address::Tcp { host, .. })) => host.parse::<std::net::IpAddr>().ok().filter(|ip| ip.is_loopback()),
        _ => None,
    })
}

async fn dial(destination: SocketAddr, source: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    match source {
        Some(ip) if destination.ip().is_loopback() && ip.is_ipv4() == destination.is_ipv4() => {
            let socket = if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(destination).await
        }
        _ => TcpStream::connect(destination).await,
    }
}

impl PeerConnector {
    pub fn channel(&self, url: &str) -> io::Result<Channel> {
        let (secure, address) = parse_address(url)?;
        let tls = if secure {
            Some(self.tls.clone().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{url}: peer TLS is not configured on this member"))
            })?)
        } else {
            None
        };
        let endpoint = Endpoint::from_static("http://peer")
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10));
        let source = self.loopback_source;
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let address = address.clone();
            let tls = tls.clone();
            async move {
                let stream = match &address {
                    Address::Tcp { host, port } => {
                        let s = dial(resolve(host, *port).await?, source).await?;
                        s.set_nodelay(true)?;
                        Stream::Tcp(s)
                    }
                    Address::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
                };
                let stream = match tls {
                    None => stream,
                    Some(cfg) => {
                        let name = match &address {
                            Address::Tcp { host, .. } => host.clone(),
                            Address::Unix(_) => "localhost".to_string(),
                        };
                        let server_name = ServerName::try_from(name)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
                        Stream::ClientTls(Box::new(TlsConnector::from(cfg).connect(server_name, stream).await?))
                    }
                };
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        });
        Ok(endpoint.connect_with_connector_lazy(connector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `client` completes a handshake with `acceptor` and reads a
    /// byte from it (over an in-memory pipe; reading also takes in any
    /// session tickets the server sends).
    async fn exchange(acceptor: ServerTls, client: Arc<rustls::ClientConfig>) -> io::Result<bool> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(a).await?;
            tls.write_all(b"x").await?;
            tls.flush().await?;
            io::Result::Ok(tls)
        });
        let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
        let dialed = async {
            let mut tls = TlsConnector::from(client).connect(name, b).await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            io::Result::Ok(tls)
        }
        .await;
        let served = server.await.map_err(io::Error::other)?;
        Ok(served.is_ok() && dialed.is_ok())
    }

    async fn handshake(files: &TlsFiles, client: Arc<rustls::ClientConfig>) -> io::Result<bool> {
        exchange(server_tls(files)?, client).await
    }

    /// A revocation list naming `serials` (unsigned by any CA the member
    /// knows: like etcd, keel reads only the serial numbers).
    fn write_crl(path: &Path, serials: &[Vec<u8>]) -> io::Result<()> {
        use rcgen::{date_time_ymd, CertificateRevocationListParams, KeyIdMethod, RevokedCertParams};
        let key = rcgen::KeyPair::generate().map_err(io::Error::other)?;
        let issuer = rcgen::Issuer::new(rcgen::CertificateParams::default(), key);
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2020, 1, 1),
            next_update: date_time_ymd(2090, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: date_time_ymd(2021, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        std::fs::write(path, params.signed_by(&issuer).map_err(io::Error::other)?.pem().map_err(io::Error::other)?)
    }

    /// A client that completed a handshake before its certificate was
    /// revoked cannot come back by resuming its session; the list is
    /// checked even for a client presenting a trusted CA certificate.
    #[tokio::test]
    async fn revoked_clients_cannot_resume_their_sessions() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let files = self_signed(dir.path(), &["localhost".to_string()], &TlsPolicy::permissive())?;
        let crl = dir.path().join("crl.pem");
        write_crl(&crl, &[vec![0x7f]])?;
        let served = TlsFiles { trusted_ca: Some(files.cert.clone()), crl: Some(crl.clone()), ..files.clone() };
        let acceptor = server_tls(&served)?;
        let client = peer_client_tls(Some(&served), &TlsPolicy::permissive())?;
        assert!(exchange(acceptor.clone(), client.clone()).await?, "not revoked yet");
        assert!(exchange(acceptor.clone(), client.clone()).await?, "still not revoked");

        let der = load_certs(&files.cert)?.remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(io::Error::other)?;
        write_crl(&crl, &[cert.raw_serial().to_vec()])?;
        assert!(!exchange(acceptor.clone(), client.clone()).await?, "revoked, the same client config must not resume");
        let fresh = peer_client_tls(Some(&served), &TlsPolicy::permissive())?;
        assert!(!exchange(acceptor, fresh).await?, "revoked");
        Ok(())
    }

    /// The list is parsed again only when its file changed; a file that
    /// disappears refuses every client until it is back.
    #[test]
    fn a_revocation_list_follows_its_file() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let files = self_signed(dir.path(), &["localhost".to_string()], &TlsPolicy::permissive())?;
        let der = load_certs(&files.cert)?.remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(io::Error::other)?;
        let serial = cert.raw_serial().to_vec();
        let crl = dir.path().join("crl.pem");
        write_crl(&crl, &[vec![0x7f]])?;
        let list = tls_policy::RevocationList::open(&crl)?;
        assert!(list.admits(&der), "not revoked yet");

        write_crl(&crl, &[vec![0x7f], serial])?;
        assert!(list.admits(&der), "the rewrite is seen at the next refresh, not before");
        list.refresh();
        assert!(!list.admits(&der), "revoked");

        std::fs::remove_file(&crl)?;
        list.refresh();
        assert!(!list.admits(&der), "an unreadable list refuses every client");
        write_crl(&crl, &[vec![0x7f]])?;
        list.refresh();
        assert!(list.admits(&der), "the list is back without the serial");
        Ok(())
    }

    #[tokio::test]
    async fn peer_dials_keep_to_the_cipher_suites_and_versions() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let tls13_only = TlsPolicy::from_flags("", "TLS1.3", "").map_err(io::Error::other)?;
        let tls12_aes128 =
            TlsPolicy::from_flags("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "", "TLS1.2").map_err(io::Error::other)?;
        let tls12_aes256 =
            TlsPolicy::from_flags("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "", "TLS1.2").map_err(io::Error::other)?;
        let server = self_signed(dir.path(), &["localhost".to_string()], &tls12_aes128)?;
        // Auto TLS dials (nothing verified) with the policy's suites.
        assert!(handshake(&server, peer_client_tls(None, &tls12_aes128)?).await?);
        assert!(!handshake(&server, peer_client_tls(None, &tls12_aes256)?).await?);
        assert!(!handshake(&server, peer_client_tls(None, &tls13_only)?).await?);
        // Verified dials too, and the CA is checked.
        let trusting = TlsFiles { trusted_ca: Some(server.cert.clone()), ..server.clone() };
        assert!(handshake(&server, peer_client_tls(Some(&trusting), &tls12_aes128)?).await?);
        assert!(!handshake(&server, peer_client_tls(Some(&trusting), &tls13_only)?).await?);
        let other = self_signed(&dir.path().join("other"), &["localhost".to_string()], &tls12_aes128)?;
        let foreign = TlsFiles { trusted_ca: Some(other.cert.clone()), ..server.clone() };
        assert!(!handshake(&server, peer_client_tls(Some(&foreign), &tls12_aes128)?).await?);
        Ok(())
    }
}
