//! Who is asking: the auth token in a request's metadata (`token`, or
//! `authorization` from the JSON gateway), else, with
//! `--client-cert-auth`, the common name of the client's verified TLS
//! certificate (etcd's CN auth).

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

use crate::auth::tokens::{simple_token_index, TokenProvider};
use crate::auth::AuthInfo;
use crate::error::{Error, Result};
use crate::server::Server;

pub use crate::transport::ClientCommonName;

/// How long a member waits to apply the entry that issued a simple token
/// it has not seen yet (the token was issued through another member).
const TOKEN_APPLY_WAIT: Duration = Duration::from_secs(5);

/// The credentials of a request; `None` when it carries none.
pub async fn auth_info<T>(server: &Server, req: &tonic::Request<T>) -> Result<Option<AuthInfo>> {
    from_parts(server, req.metadata(), req.extensions().get::<ClientCommonName>()).await
}

pub async fn from_parts(
    server: &Server,
    metadata: &MetadataMap,
    common_name: Option<&ClientCommonName>,
) -> Result<Option<AuthInfo>> {
    let token = metadata.get("token").or_else(|| metadata.get("authorization"));
    if let Some(token) = token {
        let token = token.to_str().map_err(|_| Error::InvalidAuthToken)?;
        return token_info(server, token).await.map(Some);
    }
    if !server.settings.client_cert_auth {
        return Ok(None);
    }
    // etcd ignores the certificate of requests relayed by its gateway.
    if metadata.contains_key("grpcgateway-accept") {
        return Ok(None);
    }
    Ok(common_name.map(|cn| AuthInfo { username: cn.0.clone(), revision: server.auth.revision() }))
}

async fn token_info(server: &Server, token: &str) -> Result<AuthInfo> {
    match server.auth.tokens() {
        TokenProvider::Simple(simple) => {
            let index = simple_token_index(token).ok_or(Error::InvalidAuthToken)?;
            if server.state_machine.applied_index() < index {
                let deadline = Instant::now() + TOKEN_APPLY_WAIT;
                // Beyond this member's log: ask the leader how far the
                // cluster has committed. A token from past that (forged,
                // or from another cluster) is refused at once rather than
                // waited for; without an answer, wait as before.
                if index > server.last_log_index() {
                    let committed = server.read_index_until(deadline).await;
                    if committed.is_ok_and(|committed| index > committed) {
                        return Err(Error::InvalidAuthToken);
                    }
                }
                server.wait_applied(index, deadline).await.map_err(|_| Error::InvalidAuthToken)?;
            }
            let username = simple.lookup(token).ok_or(Error::InvalidAuthToken)?;
            Ok(AuthInfo { username, revision: server.auth.revision() })
        }
        TokenProvider::Jwt(jwt) => {
            let info = jwt.verify(token).ok_or(Error::InvalidAuthToken)?;
            Ok(AuthInfo { username: info.username, revision: info.revision.unwrap_or_default() })
        }
    }
}

/// etcd's doSerialize around a read served from local state: check the
/// permission first, read, then refuse the answer if auth changed while
/// reading (the reader's rights may have been revoked meanwhile).
pub async fn authorized_read<R, F, Fut>(
    server: &Server,
    who: Option<&AuthInfo>,
    check: impl FnOnce(&AuthInfo) -> Result<()>,
    read: F,
) -> Result<R>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<R>>,
{
    if !server.auth.is_enabled() && who.is_none() {
        return read().await;
    }
    let anonymous = AuthInfo::default();
    let mut who = who.unwrap_or(&anonymous);
    // A simple token or certificate name carries the store's revision when
    // it was resolved, which for a linearizable read was before the read
    // barrier; etcd resolves the caller after it (doSerialize). A JWT's
    // revision is the token's own and stays.
    let resolved_now;
    if who.revision != 0 && matches!(server.auth.tokens(), TokenProvider::Simple(_)) {
        resolved_now = AuthInfo { username: who.username.clone(), revision: server.auth.revision() };
        who = &resolved_now;
    }
    check(who)?;
    let result = read().await?;
    if who.revision != 0 && who.revision != server.auth.revision() {
        return Err(Error::AuthOldRevision);
    }
    Ok(result)
}

/// etcd's admin check (maintenance and membership RPCs): with auth
/// enabled, only users with the root role.
pub async fn require_admin<T>(server: &Server, req: &tonic::Request<T>) -> Result<()> {
    if !server.auth.is_enabled() {
        return Ok(());
    }
    let who = auth_info(server, req).await?;
    server.auth.check_admin(who.as_ref())
}

/// etcd's requireAuthInfo (Status and alarm listing from 3.5 on): with
/// auth enabled, any authenticated user.
pub async fn require_auth_info<T>(server: &Server, req: &tonic::Request<T>) -> Result<()> {
    if !server.auth.is_enabled() {
        return Ok(());
    }
    match auth_info(server, req).await? {
        Some(_) => Ok(()),
        None => Err(Error::UserEmpty),
    }
}
