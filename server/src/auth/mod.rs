//! etcd's auth model: users, roles, key-range permissions, the auth
//! enabled flag and the auth revision, kept in the `auth` table (records)
//! and `meta` (flag, revision) and cached in memory.
//!
//! Every change goes through Raft and is made by [`AuthStore::apply`] on
//! every member in log order; each bumps the auth revision. A request
//! carries the revision its token was checked at, and apply refuses it
//! when auth changed since ("revision of auth store is old"), so a
//! permission revoked at revision N is never used by a request admitted
//! before N. Passwords are bcrypt hashes made by the API layer before
//! proposing: the plain password never reaches the log.

mod changes;
mod es512;
pub mod perms;
pub mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use keel_proto::authpb::{Permission, Role, User};
use keel_proto::etcdserverpb::{request_op, AuthenticateResponse, TxnRequest};
use keel_proto::keelpb::{internal_request::Request, internal_response::Response, Empty, RequestHeader};
use prost::Message;

use crate::error::Error;
use crate::storage::keys::{prefix_end, AUTH_ROLE_PREFIX, AUTH_USER_PREFIX, META_AUTH_ENABLED, META_AUTH_REVISION};
use crate::storage::{SharedEngine, StorageError, Table, WriteBatch};
use perms::UserPerms;
use tokens::TokenProvider;

pub const ROOT_USER: &str = "root";
pub const ROOT_ROLE: &str = "root";

fn user_key(name: &str) -> Vec<u8> {
    [AUTH_USER_PREFIX, name.as_bytes()].concat()
}

fn role_key(name: &str) -> Vec<u8> {
    [AUTH_ROLE_PREFIX, name.as_bytes()].concat()
}

/// Who sent a request, and the auth revision their credentials were
/// checked at (0: no credentials).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthInfo {
    pub username: String,
    pub revision: u64,
}

impl AuthInfo {
    pub fn from_header(h: Option<&RequestHeader>) -> AuthInfo {
        h.map(|h| AuthInfo { username: h.username.clone(), revision: h.auth_revision }).unwrap_or_default()
    }

    pub fn header(&self) -> Option<RequestHeader> {
        (self.revision != 0).then(|| RequestHeader {
            username: self.username.clone(),
            auth_revision: self.revision,
            internal: false,
        })
    }
}

#[derive(Debug, Clone, Default)]
struct AuthState {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    perms: HashMap<String, UserPerms>,
}

impl AuthState {
    fn refresh_perms(&mut self) {
        self.perms = self
            .users
            .iter()
            .map(|(name, u)| (name.clone(), UserPerms::merge(u.roles.iter().filter_map(|r| self.roles.get(r)))))
            .collect();
    }

    fn has_root_role(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.iter().any(|r| r == ROOT_ROLE))
    }

    /// etcd's isOpPermitted.
    fn check(&self, who: &AuthInfo, allowed: impl FnOnce(&UserPerms) -> bool) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        if who.revision == 0 {
            return Err(Error::UserEmpty);
        }
        if who.revision < self.revision {
            return Err(Error::AuthOldRevision);
        }
        if !self.users.contains_key(&who.username) {
            return Err(Error::PermissionDenied);
        }
        if self.has_root_role(&who.username) {
            return Ok(());
        }
        match self.perms.get(&who.username) {
            Some(p) if allowed(p) => Ok(()),
            _ => Err(Error::PermissionDenied),
        }
    }

    fn check_admin(&self, who: &AuthInfo) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        if who.username.is_empty() {
            return Err(Error::UserEmpty);
        }
        if !self.users.contains_key(&who.username) {
            return Err(Error::UserNotFound);
        }
        if !self.has_root_role(&who.username) {
            return Err(Error::PermissionDenied);
        }
        Ok(())
    }
}

/// What an auth request did to the stored state.
enum Change {
    /// Nothing (a request that is already satisfied).
    None,
    /// The state changed, but not the auth revision (enabling auth).
    Unversioned,
    /// The state changed and the auth revision moves.
    Versioned,
}

/// What applying an auth request does besides writing records.
enum TokenEffect {
    None,
    InvalidateUser(String),
    ClearAll,
    Assign { token: String, username: String },
}

/// A decided auth change: the new state and what happens to tokens.
/// Installed with [`AuthStore::install`] once its records are written.
pub struct AuthUpdate {
    state: Option<AuthState>,
    effect: TokenEffect,
}

pub struct AuthStore {
    state: RwLock<Arc<AuthState>>,
    tokens: TokenProvider,
}

/// Whether `req` is one of the auth changes [`AuthStore::apply`] handles.
pub fn is_auth_request(req: &Request) -> bool {
    matches!(
        req,
        Request::AuthEnable(_)
            | Request::AuthDisable(_)
            | Request::Authenticate(_)
            | Request::AuthUserAdd(_)
            | Request::AuthUserDelete(_)
            | Request::AuthUserChangePassword(_)
            | Request::AuthUserGrantRole(_)
            | Request::AuthUserRevokeRole(_)
            | Request::AuthRoleAdd(_)
            | Request::AuthRoleDelete(_)
            | Request::AuthRoleGrantPermission(_)
            | Request::AuthRoleRevokePermission(_)
    )
}

fn decode<M: Message + Default>(v: &[u8]) -> Result<M, StorageError> {
    M::decode(v).map_err(|e| StorageError::Corruption(format!("auth record: {e}")))
}

impl AuthStore {
    pub fn load(engine: &SharedEngine, tokens: TokenProvider) -> Result<Self, StorageError> {
        let store = Self { state: RwLock::new(Arc::new(AuthState::default())), tokens };
        store.reload(engine)?;
        Ok(store)
    }

    /// Rebuilds the cache from storage (start-up, snapshot install).
    pub fn reload(&self, engine: &SharedEngine) -> Result<(), StorageError> {
        let mut state = AuthState {
            enabled: engine.get(Table::Meta, META_AUTH_ENABLED)?.is_some_and(|v| v == [1]),
            // A fresh etcd auth store starts at revision 1.
            revision: engine
                .get(Table::Meta, META_AUTH_REVISION)?
                .and_then(|v| crate::storage::keys::decode_u64(&v))
                .unwrap_or(1),
            ..Default::default()
        };
        let mut failure = None;
        for (prefix, is_user) in [(AUTH_USER_PREFIX, true), (AUTH_ROLE_PREFIX, false)] {
            let end = prefix_end(prefix).unwrap_or_default();
            engine.scan(Table::Auth, prefix, Some(&end), &mut |k, v| {
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let record = if is_user {
                    decode::<User>(v).map(|u| {
                        state.users.insert(name, u);
                    })
                } else {
                    decode::<Role>(v).map(|r| {
                        state.roles.insert(name, r);
                    })
                };
                if let Err(e) = record {
                    failure = Some(e);
                    return Ok(false);
                }
                Ok(true)
            })?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        state.refresh_perms();
        // A snapshot may skip user deletions and password changes whose
        // tokens would otherwise outlive them.
        if !state.enabled || state.revision != self.snapshot().revision {
            if let Some(s) = self.tokens.simple_tokens() {
                s.clear();
            }
        }
        if let Ok(mut current) = self.state.write() {
            *current = Arc::new(state);
        }
        Ok(())
    }

    fn snapshot(&self) -> Arc<AuthState> {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn tokens(&self) -> &TokenProvider {
        &self.tokens
    }

    pub fn is_enabled(&self) -> bool {
        self.snapshot().enabled
    }

    pub fn revision(&self) -> u64 {
        self.snapshot().revision
    }

    /// Checks a password (bcrypt, slow: call off the async threads).
    /// Returns the auth revision it was checked at.
    pub fn check_password(&self, name: &str, password: &str) -> Result<u64, Error> {
        let state = self.snapshot();
        if !state.enabled {
            return Err(Error::AuthNotEnabled);
        }
        let user = state.users.get(name).ok_or(Error::AuthFailed)?;
        if user.options.as_ref().is_some_and(|o| o.no_password) {
            return Err(Error::NoPasswordUser);
        }
        let hash = std::str::from_utf8(&user.password).map_err(|_| Error::AuthFailed)?;
        match bcrypt::verify(password, hash) {
            Ok(true) => Ok(state.revision),
            _ => Err(Error::AuthFailed),
        }
    }

    pub fn user_exists(&self, name: &str) -> bool {
        self.snapshot().users.contains_key(name)
    }

    pub fn check_admin(&self, who: Option<&AuthInfo>) -> Result<(), Error> {
        let state = self.snapshot();
        match who {
            Some(w) => state.check_admin(w),
            None => state.check_admin(&AuthInfo::default()),
        }
    }

    /// Any known user with current credentials (when auth is enabled):
    /// what keel asks of Compact, which touches no key range (etcd 3.4
    /// lets anonymous clients compact).
    pub fn check_authenticated(&self, who: &AuthInfo) -> Result<(), Error> {
        self.snapshot().check(who, |_| true)
    }

    pub fn check_read(&self, who: &AuthInfo, key: &[u8], range_end: &[u8]) -> Result<(), Error> {
        self.snapshot().check(who, |p| p.can_read(key, range_end))
    }

    pub fn check_write(&self, who: &AuthInfo, key: &[u8], range_end: &[u8]) -> Result<(), Error> {
        self.snapshot().check(who, |p| p.can_write(key, range_end))
    }

    /// etcd's checkTxnAuth: every compare needs read permission, every op
    /// its own (nested txns included; etcd 3.4 skips them, which would let
    /// a nested txn bypass the check).
    pub fn check_txn(&self, who: &AuthInfo, txn: &TxnRequest) -> Result<(), Error> {
        let state = self.snapshot();
        if !state.enabled {
            return Ok(());
        }
        check_txn_in(&state, who, txn)
    }

    /// The read-only auth RPCs (served from local state after a
    /// linearizable barrier).
    pub fn user_get(&self, who: Option<&AuthInfo>, name: &str) -> Result<Vec<String>, Error> {
        let state = self.snapshot();
        let me = who.is_some_and(|w| w.username == name);
        if let Err(e) = state.check_admin(who.unwrap_or(&AuthInfo::default())) {
            if !me {
                return Err(e);
            }
        }
        state.users.get(name).map(|u| u.roles.clone()).ok_or(Error::UserNotFound)
    }

    pub fn user_list(&self, who: Option<&AuthInfo>) -> Result<Vec<String>, Error> {
        let state = self.snapshot();
        state.check_admin(who.unwrap_or(&AuthInfo::default()))?;
        Ok(state.users.keys().cloned().collect())
    }

    pub fn role_get(&self, who: Option<&AuthInfo>, role: &str) -> Result<Vec<Permission>, Error> {
        let state = self.snapshot();
        if let Err(e) = state.check_admin(who.unwrap_or(&AuthInfo::default())) {
            let has_role =
                who.and_then(|w| state.users.get(&w.username)).is_some_and(|u| u.roles.iter().any(|r| r == role));
            if !has_role {
                return Err(e);
            }
        }
        state.roles.get(role).map(|r| r.key_permission.clone()).ok_or(Error::RoleNotFound)
    }

    pub fn role_list(&self, who: Option<&AuthInfo>) -> Result<Vec<String>, Error> {
        let state = self.snapshot();
        state.check_admin(who.unwrap_or(&AuthInfo::default()))?;
        Ok(state.roles.keys().cloned().collect())
    }

    /// Decides an auth change for the entry at `index`, writing its
    /// records into `batch`. Nothing is visible until [`Self::install`].
    pub fn apply(
        &self,
        who: &AuthInfo,
        req: &Request,
        index: u64,
        batch: &mut WriteBatch,
    ) -> Result<(Response, AuthUpdate), Error> {
        let current = self.snapshot();
        if let Request::Authenticate(a) = req {
            // Authenticating changes nothing stored.
            let (token, effect) = current.authenticate(a, index)?;
            let response = Response::Authenticate(AuthenticateResponse { header: None, token });
            return Ok((response, AuthUpdate { state: None, effect }));
        }
        current.check_admin(who)?;
        let mut s = (*current).clone();
        let (change, effect) = s.change(req, batch)?;
        let state = match change {
            Change::None => None,
            Change::Unversioned => Some(s),
            Change::Versioned => {
                s.revision += 1;
                batch.put(Table::Meta, META_AUTH_REVISION, s.revision.to_be_bytes().to_vec());
                s.refresh_perms();
                Some(s)
            }
        };
        Ok((Response::Empty(Empty {}), AuthUpdate { state, effect }))
    }

    /// Makes an applied change visible (after its batch is written).
    pub fn install(&self, update: AuthUpdate) {
        if let Some(state) = update.state {
            if let Ok(mut current) = self.state.write() {
                *current = Arc::new(state);
            }
        }
        let Some(simple) = self.tokens.simple_tokens() else {
            return;
        };
        match update.effect {
            TokenEffect::None => {}
            TokenEffect::InvalidateUser(name) => simple.invalidate_user(&name),
            TokenEffect::ClearAll => simple.clear(),
            TokenEffect::Assign { token, username } => simple.assign(&token, &username),
        }
    }
}

fn check_ops(state: &AuthState, who: &AuthInfo, ops: &[keel_proto::etcdserverpb::RequestOp]) -> Result<(), Error> {
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => state.check(who, |p| p.can_read(&r.key, &r.range_end))?,
            Some(request_op::Request::RequestPut(r)) => {
                state.check(who, |p| p.can_write(&r.key, &[]))?;
                if r.prev_kv {
                    state.check(who, |p| p.can_read(&r.key, &[]))?;
                }
            }
            Some(request_op::Request::RequestDeleteRange(r)) => {
                if r.prev_kv {
                    state.check(who, |p| p.can_read(&r.key, &r.range_end))?;
                }
                state.check(who, |p| p.can_write(&r.key, &r.range_end))?;
            }
            Some(request_op::Request::RequestTxn(t)) => check_txn_in(state, who, t)?,
            None => {}
        }
    }
    Ok(())
}

fn check_txn_in(state: &AuthState, who: &AuthInfo, txn: &TxnRequest) -> Result<(), Error> {
    for c in &txn.compare {
        state.check(who, |p| p.can_read(&c.key, &c.range_end))?;
    }
    check_ops(state, who, &txn.success)?;
    check_ops(state, who, &txn.failure)
}

#[cfg(test)]
mod tests;
