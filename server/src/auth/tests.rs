use std::sync::Arc;
use std::time::Duration;

use keel_proto::authpb::{permission::Type as PermType, Permission, UserAddOptions};
use keel_proto::etcdserverpb::{
    AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest, AuthRoleGrantPermissionRequest, AuthUserAddRequest,
    AuthUserChangePasswordRequest, AuthUserDeleteRequest, AuthUserGrantRoleRequest, AuthUserRevokeRoleRequest,
};
use keel_proto::keelpb::AuthenticateInternal;

use super::*;
use crate::storage::memory::MemoryEngine;

struct Fixture {
    engine: SharedEngine,
    store: AuthStore,
    index: u64,
}

impl Fixture {
    fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let engine: SharedEngine = Arc::new(MemoryEngine::new());
        let store = AuthStore::load(&engine, TokenProvider::from_flag("simple", Duration::from_secs(60))?)?;
        Ok(Self { engine, store, index: 1 })
    }

    /// Applies `req` as `who`, as the applier does.
    fn apply(&mut self, who: &AuthInfo, req: Request) -> Result<Response, Error> {
        let mut batch = WriteBatch::new();
        self.index += 1;
        let (resp, update) = self.store.apply(who, &req, self.index, &mut batch)?;
        self.engine.write(batch, false).map_err(Error::from)?;
        self.store.install(update);
        Ok(resp)
    }

    fn root(&self) -> AuthInfo {
        AuthInfo { username: ROOT_USER.into(), revision: self.store.revision() }
    }

    fn add_user(&mut self, who: &AuthInfo, name: &str, password: &str) -> Result<Response, Error> {
        let hashed = bcrypt::hash(password, 4).map_err(|e| Error::Internal(e.to_string()))?;
        self.apply(
            who,
            Request::AuthUserAdd(AuthUserAddRequest {
                name: name.into(),
                hashed_password: hashed,
                ..Default::default()
            }),
        )
    }

    /// root with the root role, auth enabled.
    fn enabled() -> Result<Self, Box<dyn std::error::Error>> {
        let mut f = Fixture::new()?;
        let nobody = AuthInfo::default();
        f.add_user(&nobody, ROOT_USER, "rootpw")?;
        f.apply(
            &nobody,
            Request::AuthUserGrantRole(AuthUserGrantRoleRequest { user: "root".into(), role: "root".into() }),
        )?;
        f.apply(&nobody, Request::AuthEnable(AuthEnableRequest {}))?;
        Ok(f)
    }
}

fn perm(key: &str, end: &str, t: PermType) -> Permission {
    Permission { perm_type: t as i32, key: key.as_bytes().to_vec().into(), range_end: end.as_bytes().to_vec().into() }
}

#[test]
fn enabling_needs_root_with_the_root_role() -> Result<(), Box<dyn std::error::Error>> {
    let mut f = Fixture::new()?;
    let nobody = AuthInfo::default();
    assert_eq!(f.apply(&nobody, Request::AuthEnable(AuthEnableRequest {})).err(), Some(Error::RootUserNotExist));
    f.add_user(&nobody, ROOT_USER, "pw")?;
    assert_eq!(f.apply(&nobody, Request::AuthEnable(AuthEnableRequest {})).err(), Some(Error::RootRoleNotExist));
    f.apply(
        &nobody,
        Request::AuthUserGrantRole(AuthUserGrantRoleRequest { user: "root".into(), role: "root".into() }),
    )?;
    f.apply(&nobody, Request::AuthEnable(AuthEnableRequest {}))?;
    assert!(f.store.is_enabled());
    // Once enabled, changes need an admin and root cannot be taken apart.
    assert_eq!(f.add_user(&nobody, "u", "pw").err(), Some(Error::UserEmpty));
    let root = f.root();
    assert_eq!(
        f.apply(&root, Request::AuthUserDelete(AuthUserDeleteRequest { name: "root".into() })).err(),
        Some(Error::InvalidAuthMgmt)
    );
    assert_eq!(
        f.apply(
            &root,
            Request::AuthUserRevokeRole(AuthUserRevokeRoleRequest { name: "root".into(), role: "root".into() })
        )
        .err(),
        Some(Error::InvalidAuthMgmt)
    );
    Ok(())
}

#[test]
fn every_change_bumps_the_revision_and_old_credentials_are_refused() -> Result<(), Box<dyn std::error::Error>> {
    let mut f = Fixture::enabled()?;
    let root = f.root();
    f.add_user(&root, "alice", "pw")?;
    let alice_at_start = AuthInfo { username: "alice".into(), revision: f.store.revision() };
    f.apply(&f.root(), Request::AuthRoleAdd(AuthRoleAddRequest { name: "reader".into() }))?;
    f.apply(
        &f.root(),
        Request::AuthRoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: "reader".into(),
            perm: Some(perm("app/", "app0", PermType::Read)),
        }),
    )?;
    f.apply(
        &f.root(),
        Request::AuthUserGrantRole(AuthUserGrantRoleRequest { user: "alice".into(), role: "reader".into() }),
    )?;
    assert!(f.store.revision() > alice_at_start.revision);
    assert_eq!(f.store.check_read(&alice_at_start, b"app/x", b""), Err(Error::AuthOldRevision));
    let alice = AuthInfo { username: "alice".into(), revision: f.store.revision() };
    assert_eq!(f.store.check_read(&alice, b"app/x", b""), Ok(()));
    assert_eq!(f.store.check_read(&alice, b"app/", b"app0"), Ok(()));
    assert_eq!(f.store.check_write(&alice, b"app/x", b""), Err(Error::PermissionDenied));
    assert_eq!(f.store.check_read(&alice, b"other", b""), Err(Error::PermissionDenied));
    assert_eq!(f.store.check_read(&AuthInfo::default(), b"app/x", b""), Err(Error::UserEmpty));
    // Deleting the role takes the permission away from alice.
    f.apply(&f.root(), Request::AuthRoleDelete(AuthRoleDeleteRequest { role: "reader".into() }))?;
    let alice = AuthInfo { username: "alice".into(), revision: f.store.revision() };
    assert_eq!(f.store.check_read(&alice, b"app/x", b""), Err(Error::PermissionDenied));
    assert_eq!(f.store.user_get(Some(&alice), "alice"), Ok(Vec::new()));
    assert_eq!(f.store.user_list(Some(&alice)), Err(Error::PermissionDenied));
    Ok(())
}

#[test]
fn passwords_are_checked_against_bcrypt_hashes_and_tokens_die_with_changes() -> Result<(), Box<dyn std::error::Error>> {
    let mut f = Fixture::enabled()?;
    let root = f.root();
    f.add_user(&root, "bob", "secret")?;
    f.apply(
        &f.root(),
        Request::AuthUserAdd(AuthUserAddRequest {
            name: "cert-only".into(),
            options: Some(UserAddOptions { no_password: true }),
            ..Default::default()
        }),
    )?;
    assert!(f.store.check_password("bob", "secret").is_ok());
    assert_eq!(f.store.check_password("bob", "wrong"), Err(Error::AuthFailed));
    assert_eq!(f.store.check_password("nobody", "x"), Err(Error::AuthFailed));
    assert_eq!(f.store.check_password("cert-only", ""), Err(Error::NoPasswordUser));
    // The stored record holds a hash, never the password.
    let stored = f.engine.get(Table::Auth, &user_key("bob"))?.ok_or("bob not stored")?;
    assert!(!String::from_utf8_lossy(&stored).contains("secret"));

    let resp = f.apply(
        &AuthInfo::default(),
        Request::Authenticate(AuthenticateInternal { name: "bob".into(), simple_token: "abcdefghijklmnop".into() }),
    )?;
    let Response::Authenticate(a) = resp else { return Err("expected an Authenticate response".into()) };
    assert_eq!(a.token, format!("abcdefghijklmnop.{}", f.index));
    let lookup = |f: &Fixture, token: &str| f.store.tokens().simple_tokens().and_then(|s| s.lookup(token));
    assert_eq!(lookup(&f, &a.token).as_deref(), Some("bob"));
    let hashed = bcrypt::hash("new", 4)?;
    f.apply(
        &f.root(),
        Request::AuthUserChangePassword(AuthUserChangePasswordRequest {
            name: "bob".into(),
            hashed_password: hashed,
            ..Default::default()
        }),
    )?;
    assert_eq!(lookup(&f, &a.token), None, "a password change invalidates the user's tokens");
    assert!(f.store.check_password("bob", "new").is_ok());
    Ok(())
}

#[test]
fn state_survives_a_reload_from_storage() -> Result<(), Box<dyn std::error::Error>> {
    let mut f = Fixture::enabled()?;
    f.apply(&f.root(), Request::AuthRoleAdd(AuthRoleAddRequest { name: "w".into() }))?;
    let revision = f.store.revision();
    let reloaded = AuthStore::load(&f.engine, TokenProvider::from_flag("simple", Duration::from_secs(60))?)?;
    assert!(reloaded.is_enabled());
    assert_eq!(reloaded.revision(), revision);
    assert_eq!(reloaded.role_list(Some(&f.root()))?, vec!["w".to_string()]);
    Ok(())
}

#[test]
fn txn_checks_compares_and_nested_ops() -> Result<(), Box<dyn std::error::Error>> {
    use keel_proto::etcdserverpb::{request_op, Compare, PutRequest, RequestOp, TxnRequest};
    let mut f = Fixture::enabled()?;
    f.add_user(&f.root(), "w", "pw")?;
    f.apply(&f.root(), Request::AuthRoleAdd(AuthRoleAddRequest { name: "rw".into() }))?;
    f.apply(
        &f.root(),
        Request::AuthRoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: "rw".into(),
            perm: Some(perm("mine/", "mine0", PermType::Readwrite)),
        }),
    )?;
    f.apply(&f.root(), Request::AuthUserGrantRole(AuthUserGrantRoleRequest { user: "w".into(), role: "rw".into() }))?;
    let w = AuthInfo { username: "w".into(), revision: f.store.revision() };
    let put = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    };
    let compare = |k: &str| Compare { key: k.as_bytes().to_vec().into(), ..Default::default() };
    let ok = TxnRequest { compare: vec![compare("mine/a")], success: vec![put("mine/b")], failure: vec![] };
    assert_eq!(f.store.check_txn(&w, &ok), Ok(()));
    let peeks = TxnRequest { compare: vec![compare("secret")], success: vec![put("mine/b")], failure: vec![] };
    assert_eq!(f.store.check_txn(&w, &peeks), Err(Error::PermissionDenied));
    let nested = TxnRequest {
        compare: vec![],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestTxn(TxnRequest {
                compare: vec![],
                success: vec![],
                failure: vec![put("elsewhere")],
            })),
        }],
        failure: vec![],
    };
    assert_eq!(f.store.check_txn(&w, &nested), Err(Error::PermissionDenied));
    Ok(())
}
