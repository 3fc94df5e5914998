//! Each auth request's change to the auth state, as etcd's auth store
//! makes it: the checks and their errors in etcd's order, the records
//! written to the batch, and what happens to tokens.

use keel_proto::authpb::{Role, User, UserAddOptions};
use keel_proto::etcdserverpb::{
    AuthRoleAddRequest, AuthRoleDeleteRequest, AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest,
    AuthUserAddRequest, AuthUserChangePasswordRequest, AuthUserDeleteRequest, AuthUserGrantRoleRequest,
    AuthUserRevokeRoleRequest,
};
use keel_proto::keelpb::{internal_request::Request, AuthenticateInternal};
use prost::Message;

use super::{role_key, user_key, AuthState, Change, TokenEffect, ROOT_ROLE, ROOT_USER};
use crate::error::Error;
use crate::storage::keys::META_AUTH_ENABLED;
use crate::storage::{Table, WriteBatch};

type Changed = Result<(Change, TokenEffect), Error>;

fn changed() -> Changed {
    Ok((Change::Versioned, TokenEffect::None))
}

fn unchanged() -> Changed {
    Ok((Change::None, TokenEffect::None))
}

impl AuthState {
    /// The token for a successful Authenticate at log `index` (empty for
    /// JWT, which the API layer signs), and its effect.
    pub(super) fn authenticate(&self, a: &AuthenticateInternal, index: u64) -> Result<(String, TokenEffect), Error> {
        if !self.enabled {
            return Err(Error::AuthNotEnabled);
        }
        let user = self.users.get(&a.name).ok_or(Error::AuthFailed)?;
        if user.options.as_ref().is_some_and(|o| o.no_password) {
            return Err(Error::AuthFailed);
        }
        if a.simple_token.is_empty() {
            return Ok((String::new(), TokenEffect::None));
        }
        let token = format!("{}.{index}", a.simple_token);
        Ok((token.clone(), TokenEffect::Assign { token, username: a.name.clone() }))
    }

    /// Applies an admin request (the caller checked the permission).
    pub(super) fn change(&mut self, req: &Request, batch: &mut WriteBatch) -> Changed {
        match req {
            Request::AuthEnable(_) => self.enable(batch),
            Request::AuthDisable(_) => self.disable(batch),
            Request::AuthUserAdd(r) => self.user_add(r, batch),
            Request::AuthUserDelete(r) => self.user_delete(r, batch),
            Request::AuthUserChangePassword(r) => self.user_change_password(r, batch),
            Request::AuthUserGrantRole(r) => self.user_grant_role(r, batch),
            Request::AuthUserRevokeRole(r) => self.user_revoke_role(r, batch),
            Request::AuthRoleAdd(r) => self.role_add(r, batch),
            Request::AuthRoleDelete(r) => self.role_delete(r, batch),
            Request::AuthRoleGrantPermission(r) => self.role_grant_permission(r, batch),
            Request::AuthRoleRevokePermission(r) => self.role_revoke_permission(r, batch),
            _ => Err(Error::Unimplemented("this request in the auth store")),
        }
    }

    fn enable(&mut self, batch: &mut WriteBatch) -> Changed {
        if self.enabled {
            tracing::info!("authentication is already enabled; ignored auth enable request");
            return unchanged();
        }
        if !self.users.contains_key(ROOT_USER) {
            return Err(Error::RootUserNotExist);
        }
        if !self.has_root_role(ROOT_USER) {
            return Err(Error::RootRoleNotExist);
        }
        self.enabled = true;
        batch.put(Table::Meta, META_AUTH_ENABLED, vec![1]);
        tracing::info!("enabled authentication");
        // etcd does not bump the revision on enable.
        Ok((Change::Unversioned, TokenEffect::None))
    }

    fn disable(&mut self, batch: &mut WriteBatch) -> Changed {
        if !self.enabled {
            return unchanged();
        }
        self.enabled = false;
        batch.put(Table::Meta, META_AUTH_ENABLED, vec![0]);
        tracing::info!("disabled authentication");
        Ok((Change::Versioned, TokenEffect::ClearAll))
    }

    fn user_add(&mut self, r: &AuthUserAddRequest, batch: &mut WriteBatch) -> Changed {
        if r.name.is_empty() {
            return Err(Error::UserEmpty);
        }
        if self.users.contains_key(&r.name) {
            return Err(Error::UserAlreadyExists);
        }
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        let user = User {
            name: r.name.clone().into_bytes().into(),
            password: if no_password { Default::default() } else { r.hashed_password.clone().into_bytes().into() },
            roles: Vec::new(),
            options: Some(r.options.unwrap_or(UserAddOptions { no_password: false })),
        };
        batch.put(Table::Auth, user_key(&r.name), user.encode_to_vec());
        self.users.insert(r.name.clone(), user);
        tracing::info!(user_name = %r.name, "added a user");
        changed()
    }

    fn user_delete(&mut self, r: &AuthUserDeleteRequest, batch: &mut WriteBatch) -> Changed {
        if self.enabled && r.name == ROOT_USER {
            return Err(Error::InvalidAuthMgmt);
        }
        if self.users.remove(&r.name).is_none() {
            return Err(Error::UserNotFound);
        }
        batch.delete(Table::Auth, user_key(&r.name));
        tracing::info!(user_name = %r.name, "deleted a user");
        Ok((Change::Versioned, TokenEffect::InvalidateUser(r.name.clone())))
    }

    fn user_change_password(&mut self, r: &AuthUserChangePasswordRequest, batch: &mut WriteBatch) -> Changed {
        let user = self.users.get_mut(&r.name).ok_or(Error::UserNotFound)?;
        user.password = r.hashed_password.clone().into_bytes().into();
        batch.put(Table::Auth, user_key(&r.name), user.encode_to_vec());
        tracing::info!(user_name = %r.name, "changed a password of a user");
        Ok((Change::Versioned, TokenEffect::InvalidateUser(r.name.clone())))
    }

    fn user_grant_role(&mut self, r: &AuthUserGrantRoleRequest, batch: &mut WriteBatch) -> Changed {
        if r.role != ROOT_ROLE && !self.roles.contains_key(&r.role) {
            // etcd looks the user up first.
            let _ = self.users.get(&r.user).ok_or(Error::UserNotFound)?;
            return Err(Error::RoleNotFound);
        }
        let user = self.users.get_mut(&r.user).ok_or(Error::UserNotFound)?;
        match user.roles.binary_search(&r.role) {
            Ok(_) => {
                tracing::warn!(user_name = %r.user, role = %r.role, "ignored grant of a role the user already has");
                return unchanged();
            }
            Err(at) => user.roles.insert(at, r.role.clone()),
        }
        batch.put(Table::Auth, user_key(&r.user), user.encode_to_vec());
        tracing::info!(user_name = %r.user, role = %r.role, "granted a role to a user");
        changed()
    }

    fn user_revoke_role(&mut self, r: &AuthUserRevokeRoleRequest, batch: &mut WriteBatch) -> Changed {
        if self.enabled && r.name == ROOT_USER && r.role == ROOT_ROLE {
            return Err(Error::InvalidAuthMgmt);
        }
        let user = self.users.get_mut(&r.name).ok_or(Error::UserNotFound)?;
        let before = user.roles.len();
        user.roles.retain(|role| role != &r.role);
        if user.roles.len() == before {
            return Err(Error::RoleNotGranted);
        }
        batch.put(Table::Auth, user_key(&r.name), user.encode_to_vec());
        tracing::info!(user_name = %r.name, role = %r.role, "revoked a role from a user");
        changed()
    }

    fn role_add(&mut self, r: &AuthRoleAddRequest, batch: &mut WriteBatch) -> Changed {
        if r.name.is_empty() {
            return Err(Error::RoleEmpty);
        }
        if self.roles.contains_key(&r.name) {
            return Err(Error::RoleAlreadyExists);
        }
        let role = Role { name: r.name.clone().into_bytes().into(), key_permission: Vec::new() };
        batch.put(Table::Auth, role_key(&r.name), role.encode_to_vec());
        self.roles.insert(r.name.clone(), role);
        tracing::info!(role = %r.name, "created a role");
        changed()
    }

    fn role_delete(&mut self, r: &AuthRoleDeleteRequest, batch: &mut WriteBatch) -> Changed {
        if self.enabled && r.role == ROOT_ROLE {
            return Err(Error::InvalidAuthMgmt);
        }
        if self.roles.remove(&r.role).is_none() {
            return Err(Error::RoleNotFound);
        }
        batch.delete(Table::Auth, role_key(&r.role));
        // Users holding the role lose it.
        for (name, user) in self.users.iter_mut() {
            let before = user.roles.len();
            user.roles.retain(|role| role != &r.role);
            if user.roles.len() != before {
                batch.put(Table::Auth, user_key(name), user.encode_to_vec());
            }
        }
        tracing::info!(role = %r.role, "deleted a role");
        changed()
    }

    fn role_grant_permission(&mut self, r: &AuthRoleGrantPermissionRequest, batch: &mut WriteBatch) -> Changed {
        let role = self.roles.get_mut(&r.name).ok_or(Error::RoleNotFound)?;
        let perm = r.perm.clone().unwrap_or_default();
        match role.key_permission.iter_mut().find(|p| p.key == perm.key && p.range_end == perm.range_end) {
            Some(existing) => existing.perm_type = perm.perm_type,
            None => {
                role.key_permission.push(perm);
                role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        batch.put(Table::Auth, role_key(&r.name), role.encode_to_vec());
        tracing::info!(role = %r.name, "granted or updated a permission of a role");
        changed()
    }

    fn role_revoke_permission(&mut self, r: &AuthRoleRevokePermissionRequest, batch: &mut WriteBatch) -> Changed {
        let role = self.roles.get_mut(&r.role).ok_or(Error::RoleNotFound)?;
        let before = role.key_permission.len();
        role.key_permission.retain(|p| p.key != r.key || p.range_end != r.range_end);
        if role.key_permission.len() == before {
            return Err(Error::PermissionNotGranted);
        }
        batch.put(Table::Auth, role_key(&r.role), role.encode_to_vec());
        tracing::info!(role = %r.role, "revoked a permission of a role");
        changed()
    }
}
