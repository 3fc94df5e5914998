//! etcdserverpb.Cluster: membership changes run on the leader (see
//! `membership.rs`); the member list combines Raft's membership with the
//! published member records.

use std::sync::Arc;

use keel_proto::etcdserverpb::cluster_server::Cluster;
use keel_proto::etcdserverpb::{
    MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use tonic::{Request, Response, Status};

use crate::server::Server;
use keel_proto::keelpb::{cluster_change_request::Change, ClusterChangeRequest};

pub struct ClusterService {
    server: Arc<Server>,
}

impl ClusterService {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

impl ClusterService {
    fn member_list(&self) -> Vec<keel_proto::etcdserverpb::Member> {
        let membership = self.server.raft.metrics().borrow().membership_config.membership().clone();
        self.server.members.members(&membership)
    }

    async fn change(&self, change: Change) -> Result<Option<keel_proto::etcdserverpb::Member>, Status> {
        Ok(self.server.cluster_change(ClusterChangeRequest { change: Some(change) }).await?)
    }

    fn header(&self) -> Option<keel_proto::etcdserverpb::ResponseHeader> {
        Some(self.server.header(self.server.mvcc.current_rev()))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        let member = {
            super::credentials::require_admin(&self.server, &req).await?;
            self.change(Change::Add(req.into_inner()))
        }
        .await?;
        Ok(Response::new(MemberAddResponse { header: self.header(), member, members: self.member_list() }))
    }

    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        {
            super::credentials::require_admin(&self.server, &req).await?;
            self.change(Change::Remove(req.into_inner()))
        }
        .await?;
        Ok(Response::new(MemberRemoveResponse { header: self.header(), members: self.member_list() }))
    }

    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        {
            super::credentials::require_admin(&self.server, &req).await?;
            self.change(Change::Update(req.into_inner()))
        }
        .await?;
        Ok(Response::new(MemberUpdateResponse { header: self.header(), members: self.member_list() }))
    }

    async fn member_list(&self, req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        if req.get_ref().linearizable {
            // etcd 3.5+: a read index, then (auth on) an authenticated user.
            self.server.linearizable_barrier().await?;
            super::credentials::require_auth_info(&self.server, &req).await?;
        }
        Ok(Response::new(MemberListResponse { header: self.header(), members: self.member_list() }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        {
            super::credentials::require_admin(&self.server, &req).await?;
            self.change(Change::Promote(req.into_inner()))
        }
        .await?;
        Ok(Response::new(MemberPromoteResponse { header: self.header(), members: self.member_list() }))
    }
}
