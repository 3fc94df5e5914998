//! etcdserverpb.Auth: changes go through Raft (the admin check runs at
//! apply, against the auth state of that log position); the read-only
//! RPCs are served from local state after a linearizable barrier.
//! Passwords are hashed here, before proposing, so the Raft log and
//! snapshots only ever hold bcrypt hashes.

use std::sync::Arc;

use keel_proto::etcdserverpb::auth_server::Auth;
use keel_proto::etcdserverpb::{
    AuthDisableRequest, AuthDisableResponse, AuthEnableRequest, AuthEnableResponse, AuthRoleAddRequest,
    AuthRoleAddResponse, AuthRoleDeleteRequest, AuthRoleDeleteResponse, AuthRoleGetRequest, AuthRoleGetResponse,
    AuthRoleGrantPermissionRequest, AuthRoleGrantPermissionResponse, AuthRoleListRequest, AuthRoleListResponse,
    AuthRoleRevokePermissionRequest, AuthRoleRevokePermissionResponse, AuthStatusRequest, AuthStatusResponse,
    AuthUserAddRequest, AuthUserAddResponse, AuthUserChangePasswordRequest, AuthUserChangePasswordResponse,
    AuthUserDeleteRequest, AuthUserDeleteResponse, AuthUserGetRequest, AuthUserGetResponse, AuthUserGrantRoleRequest,
    AuthUserGrantRoleResponse, AuthUserListRequest, AuthUserListResponse, AuthUserRevokeRoleRequest,
    AuthUserRevokeRoleResponse, AuthenticateRequest, AuthenticateResponse, ResponseHeader,
};
use keel_proto::keelpb::{
    internal_request::Request as Internal, internal_response::Response as Applied, AuthenticateInternal,
    InternalRequest,
};
use tonic::{Request, Response, Status};

use super::credentials;
use crate::auth::tokens::{simple_token_prefix, TokenProvider};
use crate::auth::AuthInfo;
use crate::error::Error;

type Result<T, E = Error> = std::result::Result<T, E>;
use crate::server::Server;

pub struct AuthService {
    server: Arc<Server>,
}

impl AuthService {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(self.server.header(self.server.mvcc.current_rev()))
    }

    /// Proposes an auth change on behalf of the sender of `req`.
    async fn change<T>(&self, req: &Request<T>, change: Internal) -> Result<()> {
        let who = credentials::auth_info(&self.server, req).await?;
        let internal = InternalRequest { header: who.as_ref().and_then(AuthInfo::header), request: Some(change) };
        self.server.propose(internal).await?;
        Ok(())
    }

    /// The sender of a read-only auth RPC, once local state is current.
    async fn reader<T>(&self, req: &Request<T>) -> Result<Option<AuthInfo>> {
        let who = credentials::auth_info(&self.server, req).await?;
        self.server.linearizable_barrier().await?;
        Ok(who)
    }

    /// Hashes a password for a UserAdd/ChangePassword from the sender of
    /// `req`; non-admins are refused first (bcrypt is slow on purpose, so
    /// it must not be anyone's to trigger). Apply checks again.
    async fn hash<T>(&self, req: &Request<T>, password: String) -> Result<String> {
        if self.server.auth.is_enabled() {
            let who = credentials::auth_info(&self.server, req).await?;
            self.server.auth.check_admin(who.as_ref())?;
        }
        let cost = self.server.settings.bcrypt_cost;
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::Internal(format!("failed to hash password: {e}")))
    }

    /// etcd's Authenticate: check the password (off the async threads:
    /// bcrypt is slow on purpose), replicate the login so every member
    /// knows a simple token, and retry if auth changed meanwhile.
    async fn authenticate_inner(&self, r: AuthenticateRequest) -> Result<String> {
        self.server.linearizable_barrier().await?;
        loop {
            let auth = self.server.auth.clone();
            let (name, password) = (r.name.clone(), r.password.clone());
            let checked = tokio::task::spawn_blocking(move || auth.check_password(&name, &password))
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            let revision = match checked {
                Ok(rev) => rev,
                Err(e) => {
                    if e != Error::AuthNotEnabled {
                        tracing::warn!(user = %r.name, error = %e, "invalid authentication was requested");
                    }
                    return Err(e);
                }
            };
            let simple_token = match self.server.auth.tokens() {
                TokenProvider::Simple(_) => simple_token_prefix(),
                TokenProvider::Jwt(_) => String::new(),
            };
            let login = Internal::Authenticate(AuthenticateInternal { name: r.name.clone(), simple_token });
            let applied = self.server.propose(InternalRequest { header: None, request: Some(login) }).await?;
            if revision != self.server.auth.revision() {
                continue;
            }
            return match (self.server.auth.tokens(), applied.response) {
                (TokenProvider::Jwt(jwt), _) => match jwt.sign(&r.name, revision) {
                    Some(Ok(token)) => Ok(token),
                    Some(Err(e)) => Err(Error::Internal(format!("failed to sign a JWT token: {e}"))),
                    None => Err(Error::Internal("auth: token signing attempted with verify-only key".into())),
                },
                (TokenProvider::Simple(_), Some(Applied::Authenticate(a))) => Ok(a.token),
                (_, other) => Err(Error::Internal(format!("unexpected apply result {other:?}"))),
            };
        }
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, r: Request<AuthEnableRequest>) -> Result<Response<AuthEnableResponse>, Status> {
        self.change(&r, Internal::AuthEnable(AuthEnableRequest {})).await?;
        Ok(Response::new(AuthEnableResponse { header: self.header() }))
    }

    async fn auth_disable(&self, r: Request<AuthDisableRequest>) -> Result<Response<AuthDisableResponse>, Status> {
        self.change(&r, Internal::AuthDisable(AuthDisableRequest {})).await?;
        Ok(Response::new(AuthDisableResponse { header: self.header() }))
    }

    async fn auth_status(&self, r: Request<AuthStatusRequest>) -> Result<Response<AuthStatusResponse>, Status> {
        self.reader(&r).await?;
        Ok(Response::new(AuthStatusResponse {
            header: self.header(),
            enabled: self.server.auth.is_enabled(),
            auth_revision: self.server.auth.revision(),
        }))
    }

    async fn authenticate(&self, r: Request<AuthenticateRequest>) -> Result<Response<AuthenticateResponse>, Status> {
        let token = self.authenticate_inner(r.into_inner()).await?;
        Ok(Response::new(AuthenticateResponse { header: self.header(), token }))
    }

    async fn user_add(&self, r: Request<AuthUserAddRequest>) -> Result<Response<AuthUserAddResponse>, Status> {
        let mut add = r.get_ref().clone();
        if !add.options.is_some_and(|o| o.no_password) {
            add.hashed_password = self.hash(&r, std::mem::take(&mut add.password)).await?;
        }
        add.password.clear();
        self.change(&r, Internal::AuthUserAdd(add)).await?;
        Ok(Response::new(AuthUserAddResponse { header: self.header() }))
    }

    async fn user_get(&self, r: Request<AuthUserGetRequest>) -> Result<Response<AuthUserGetResponse>, Status> {
        let who = self.reader(&r).await?;
        let roles = self.server.auth.user_get(who.as_ref(), &r.get_ref().name)?;
        Ok(Response::new(AuthUserGetResponse { header: self.header(), roles }))
    }

    async fn user_list(&self, r: Request<AuthUserListRequest>) -> Result<Response<AuthUserListResponse>, Status> {
        let who = self.reader(&r).await?;
        let users = self.server.auth.user_list(who.as_ref())?;
        Ok(Response::new(AuthUserListResponse { header: self.header(), users }))
    }

    async fn user_delete(&self, r: Request<AuthUserDeleteRequest>) -> Result<Response<AuthUserDeleteResponse>, Status> {
        self.change(&r, Internal::AuthUserDelete(r.get_ref().clone())).await?;
        Ok(Response::new(AuthUserDeleteResponse { header: self.header() }))
    }

    async fn user_change_password(
        &self,
        r: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let mut change = r.get_ref().clone();
        change.hashed_password = self.hash(&r, std::mem::take(&mut change.password)).await?;
        self.change(&r, Internal::AuthUserChangePassword(change)).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header: self.header() }))
    }

    async fn user_grant_role(
        &self,
        r: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        self.change(&r, Internal::AuthUserGrantRole(r.get_ref().clone())).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header: self.header() }))
    }

    async fn user_revoke_role(
        &self,
        r: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        self.change(&r, Internal::AuthUserRevokeRole(r.get_ref().clone())).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header: self.header() }))
    }

    async fn role_add(&self, r: Request<AuthRoleAddRequest>) -> Result<Response<AuthRoleAddResponse>, Status> {
        self.change(&r, Internal::AuthRoleAdd(r.get_ref().clone())).await?;
        Ok(Response::new(AuthRoleAddResponse { header: self.header() }))
    }

    async fn role_get(&self, r: Request<AuthRoleGetRequest>) -> Result<Response<AuthRoleGetResponse>, Status> {
        let who = self.reader(&r).await?;
        let perm = self.server.auth.role_get(who.as_ref(), &r.get_ref().role)?;
        Ok(Response::new(AuthRoleGetResponse { header: self.header(), perm }))
    }

    async fn role_list(&self, r: Request<AuthRoleListRequest>) -> Result<Response<AuthRoleListResponse>, Status> {
        let who = self.reader(&r).await?;
        let roles = self.server.auth.role_list(who.as_ref())?;
        Ok(Response::new(AuthRoleListResponse { header: self.header(), roles }))
    }

    async fn role_delete(&self, r: Request<AuthRoleDeleteRequest>) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        self.change(&r, Internal::AuthRoleDelete(r.get_ref().clone())).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header: self.header() }))
    }

    async fn role_grant_permission(
        &self,
        r: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        self.change(&r, Internal::AuthRoleGrantPermission(r.get_ref().clone())).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header: self.header() }))
    }

    async fn role_revoke_permission(
        &self,
        r: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        self.change(&r, Internal::AuthRoleRevokePermission(r.get_ref().clone())).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header: self.header() }))
    }
}
