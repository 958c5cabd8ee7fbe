//! Bearer-token authentication: a tower layer in front of every service that admits a call
//! only with a token whose role may make it, and tells the handlers who called.
//!
//! Health and reflection stay open, so that probes and `grpcurl list` work without a token.

use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::Either;
use tonic::{Request, Status};
use tower::{Layer, Service};

use super::limits::{Guarded, refuse};
use super::proto::{migration_service_server, rollout_service_server, stats_service_server};
use crate::domain::{Caller, Role, Tokens};

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health and reflection.
    Open,
    /// A token whose role grants this one.
    Needs(Role),
}

/// The `StatsService` methods that write.
const INGEST_METHODS: [&str; 3] = ["RecordEvent", "RecordEvents", "StreamEvents"];

/// What a call to `path` (`/package.Service/Method`) needs: ingest needs `writer`, the other
/// `StatsService` methods `reader`, and everything else of the API (the control services,
/// and any path this server does not know) `admin`.
pub fn access_for(path: &str) -> Access {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Access::Open,
        stats_service_server::SERVICE_NAME if INGEST_METHODS.contains(&method) => {
            Access::Needs(Role::Writer)
        }
        stats_service_server::SERVICE_NAME => Access::Needs(Role::Reader),
        rollout_service_server::SERVICE_NAME | migration_service_server::SERVICE_NAME => {
            Access::Needs(Role::Admin)
        }
        _ => Access::Needs(Role::Admin),
    }
}

/// The tokens a server accepts now. Clones share them: [`Authenticator::replace`] (on
/// SIGHUP) changes them for every connection at once.
#[derive(Debug, Clone)]
pub struct Authenticator {
    tokens: Arc<RwLock<Arc<Tokens>>>,
}

impl Authenticator {
    pub fn new(tokens: Tokens) -> Self {
        Self {
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
        }
    }

    /// Accepts `tokens` from now on, in place of the previous ones.
    pub fn replace(&self, tokens: Tokens) {
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
    }

    fn current(&self) -> Arc<Tokens> {
        Arc::clone(&self.tokens.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Who may make a call to `path` with `headers`, or the status that refuses it.
    pub fn admit(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<Caller>, Status> {
        let Access::Needs(needed) = access_for(path) else {
            return Ok(None);
        };
        let token = bearer_token(headers).ok_or_else(|| {
            Status::unauthenticated(
                "this call needs a token: send `authorization: Bearer <token>` metadata",
            )
        })?;
        let tokens = self.current();
        let caller = tokens
            .authenticate(token)
            .ok_or_else(|| Status::unauthenticated("the bearer token is not known"))?;
        if !caller.role.grants(needed) {
            return Err(Status::permission_denied(format!(
                "token {:?} has the {} role; {path} needs {}",
                caller.name,
                caller.role.name(),
                needed.name()
            )));
        }
        Ok(Some(caller.clone()))
    }
}

/// The token of an `authorization: Bearer <token>` header (the scheme in any case).
fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Puts an [`Authenticator`] in front of every service.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Authenticator,
}

impl AuthLayer {
    pub fn new(authenticator: Authenticator) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps: refused calls never reach the handlers; admitted ones
/// carry their [`Caller`] as a request extension.
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    authenticator: Authenticator,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for Authenticated<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Guarded<S::Future, Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        match self
            .authenticator
            .admit(request.uri().path(), request.headers())
        {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Either::Left(self.inner.call(request))
            }
            Err(status) => refuse(status),
        }
    }
}

/// The authenticated caller of `request`; `None` when the server runs without tokens.
pub(super) fn caller_of<T>(request: &Request<T>) -> Option<&Caller> {
    request.extensions().get::<Caller>()
}

/// A request message that records who made the change it asks for.
pub(super) trait Audited {
    fn actor_mut(&mut self) -> &mut String;
}

macro_rules! audited {
    ($($message:ident),* $(,)?) => {
        $(impl Audited for super::proto::$message {
            fn actor_mut(&mut self) -> &mut String {
                &mut self.actor
            }
        })*
    };
}

audited!(
    SetRolloutPercentageRequest,
    SetUserOverrideRequest,
    ClearUserOverrideRequest,
    KillSwitchRequest,
    ResetSaltRequest,
    TransitionPhaseRequest,
    StartBackfillRequest,
    VerifyConsistencyRequest,
    ResolveAmbiguousRowsRequest,
    RepairRollupsRequest,
    SetShadowSampleRateRequest,
    SetGuardSettingsRequest,
    StartScheduleRequest,
    PauseScheduleRequest,
    ResumeScheduleRequest,
    AbortScheduleRequest,
    CancelRunRequest,
);

/// The message of `request`, its `actor` the authenticated caller's token name when there is
/// one: an audit entry names who really called, not what the caller typed.
pub(super) fn audited<T: Audited>(request: Request<T>) -> T {
    let caller = caller_of(&request).map(|caller| caller.name.clone());
    let mut message = request.into_inner();
    if let Some(name) = caller {
        *message.actor_mut() = name;
    }
    message
}

/// Refuses the all-users view to an authenticated caller without the admin role.
pub(super) fn may_read_all_users<T>(request: &Request<T>) -> Result<(), Status> {
    match caller_of(request) {
        Some(caller) if !caller.role.grants(Role::Admin) => {
            Err(Status::permission_denied(format!(
                "token {:?} has the {} role; the all-users view (an empty user_id) needs admin",
                caller.name,
                caller.role.name()
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::token_sha256_hex;

    fn headers(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn paths_need_the_role_of_what_they_do() {
        assert_eq!(access_for("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            access_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(
            access_for("/stats.v1.StatsService/StreamEvents"),
            Access::Needs(Role::Writer)
        );
        assert_eq!(
            access_for("/stats.v1.StatsService/GetStats"),
            Access::Needs(Role::Reader)
        );
        assert_eq!(
            access_for("/stats.v1.RolloutService/GetRollout"),
            Access::Needs(Role::Admin)
        );
        assert_eq!(access_for("/other.Service/X"), Access::Needs(Role::Admin));
    }

    #[test]
    fn tokens_are_read_from_bearer_headers_and_replaced_whole() {
        let line = |name: &str, token: &str| format!("reader {name} {}\n", token_sha256_hex(token));
        let authenticator = Authenticator::new(Tokens::parse(&line("dash", "one")).unwrap());
        let path = "/stats.v1.StatsService/GetStats";
        let admitted = authenticator.admit(path, &headers("bearer one")).unwrap();
        assert_eq!(admitted.unwrap().name, "dash");
        let refused = authenticator
            .admit(path, &headers("Basic one"))
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        authenticator.replace(Tokens::parse(&line("dash2", "two")).unwrap());
        let refused = authenticator
            .admit(path, &headers("Bearer one"))
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(authenticator.admit(path, &headers("Bearer two")).is_ok());
        let denied = authenticator
            .admit("/stats.v1.StatsService/RecordEvent", &headers("Bearer two"))
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    }
}
