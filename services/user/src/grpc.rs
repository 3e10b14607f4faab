//! gRPC: `user.UserService`, the design's four calls, over the same store as REST.

use sqlx::AnyPool;
use tonic::{Request, Response, Status};
use trellis_service_kit::ApiError;

use crate::{
    pb::{self, user_service_server::UserService},
    store,
};

/// The gRPC service.
#[derive(Clone)]
pub struct Grpc {
    pub pool: AnyPool,
}

fn status(e: ApiError) -> Status {
    let msg = match &e.body.field {
        Some(f) => format!("{}: {}", f, e.body.message),
        None => e.body.message.clone(),
    };
    match e.status.as_u16() {
        400 | 422 => Status::invalid_argument(msg),
        404 => Status::not_found(msg),
        409 => Status::already_exists(msg),
        503 => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

fn to_pb(u: store::User) -> pb::User {
    pb::User {
        id: u.id as u64,
        name: u.name,
        email: u.email,
        age: u.age as i32,
        active: u.active,
        created_at: u.created_at,
    }
}

fn id(raw: u64) -> Result<i64, Status> {
    i64::try_from(raw)
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| Status::invalid_argument("user_id: must be a positive integer"))
}

#[tonic::async_trait]
impl UserService for Grpc {
    async fn get_user(
        &self,
        req: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let user = store::get(&self.pool, id(req.into_inner().user_id)?)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(to_pb(user)),
        }))
    }

    async fn create_user(
        &self,
        req: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let r = req.into_inner();
        let user = store::create(
            &self.pool,
            store::NewUser {
                name: r.name,
                email: r.email,
                age: r.age.into(),
            },
        )
        .await
        .map_err(status)?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(to_pb(user)),
        }))
    }

    async fn validate_user(
        &self,
        req: Request<pb::ValidateUserRequest>,
    ) -> Result<Response<pb::ValidateUserResponse>, Status> {
        let (valid, message) = match store::get(&self.pool, id(req.into_inner().user_id)?).await {
            Ok(u) if u.active => (true, "user is valid"),
            Ok(_) => (false, "user is inactive"),
            Err(e) if e.status.as_u16() == 404 => (false, "user not found"),
            Err(e) => return Err(status(e)),
        };
        Ok(Response::new(pb::ValidateUserResponse {
            valid,
            message: message.to_owned(),
        }))
    }

    async fn list_users(
        &self,
        req: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let r = req.into_inner();
        let page = if r.page == 0 { 1 } else { r.page.into() };
        let limit = if r.limit == 0 { 10 } else { r.limit.into() };
        let found = store::list(&self.pool, page, limit, &r.search)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListUsersResponse {
            users: found.users.into_iter().map(to_pb).collect(),
            total: found.total as i32,
        }))
    }
}
