//! The host daemon's REST API and its OpenAPI description (`GET /openapi.json`). Errors are
//! `{"error": "..."}` with a 4xx for what the request got wrong, as in the per-VM API
//! (`server/routes.rs`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use utoipa::OpenApi;

use super::cluster::{ClusterError, ClusterHost, Placement, VmCopy};
use super::events::DaemonEvent;
use super::metrics::{self, ProtectionFigures};
use super::migration::MigrateVm;
use super::peer_client::PeerError;
use super::peer_hosting::{PeerVmAnswer, PeerVmRequest};
use super::protection::ProtectVm;
use super::snapshots::{RestoreVm, SnapshotInfo, SnapshotVm};
use super::store::{ExitRecord, Lifecycle, PeerRecord, ProcessRecord, Relation, Role, VmRecord};
use super::vm_config::{DiskConfig, NicConfig, VmConfig};
use super::{Daemon, DaemonError};
use crate::server::routes::{error, invalid_body, no_such_endpoint, ErrorBody};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ftvmm host daemon",
        description = "Create, run and watch VMs on this host."
    ),
    paths(
        list_vms,
        create_vm,
        vm_info,
        delete_vm,
        boot_vm,
        stop_vm,
        pause_vm,
        resume_vm,
        events,
        metrics_page,
        protect_vm,
        unprotect_vm,
        vm_protection,
        failover_vm,
        release_claim,
        migrate_vm,
        vm_migration,
        cancel_migration,
        host_standby,
        host_incoming,
        drop_peer_copy,
        cluster_hosts,
        cluster_vms,
        cluster_vm,
        snapshot_vm,
        list_snapshots,
        delete_snapshot,
        restore_vm
    ),
    components(schemas(
        VmConfig,
        DiskConfig,
        NicConfig,
        VmRecord,
        Lifecycle,
        ProcessRecord,
        ExitRecord,
        Role,
        Relation,
        PeerRecord,
        ProtectVm,
        MigrateVm,
        PeerVmRequest,
        PeerVmAnswer,
        ClusterHost,
        SnapshotVm,
        RestoreVm,
        SnapshotInfo,
        VmCopy,
        Placement,
        VmView,
        DaemonEvent,
        ErrorBody
    ))
)]
struct ApiDoc;

/// A VM as the API shows it: the daemon's record, and the VM's own answer while it runs.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct VmView {
    #[serde(flatten)]
    pub record: VmRecord,
    /// The running VM's own `GET /api/v1/vm` (state, vCPUs, devices); absent when it does not run.
    #[schema(value_type = Option<Object>)]
    pub vm: Option<serde_json::Value>,
}

impl DaemonError {
    fn status(&self) -> StatusCode {
        match self {
            DaemonError::NoSuchVm(_) => StatusCode::NOT_FOUND,
            DaemonError::Config(_) => StatusCode::BAD_REQUEST,
            DaemonError::NameTaken(_) | DaemonError::WrongState { .. } => StatusCode::CONFLICT,
            DaemonError::Process { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            DaemonError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // A peer address that names no host is the request's fault; one that does not answer
            // is the peer's.
            DaemonError::Peer(PeerError::Resolve { .. }) => StatusCode::BAD_REQUEST,
            DaemonError::VmApi { .. } | DaemonError::Peer(_) => StatusCode::BAD_GATEWAY,
            DaemonError::VmRefused { status, .. } | DaemonError::PeerRefused { status, .. } => {
                match StatusCode::from_u16(*status) {
                    Ok(s) if s.is_client_error() => s,
                    _ => StatusCode::BAD_GATEWAY,
                }
            }
            DaemonError::NoPeering(_) => StatusCode::CONFLICT,
            DaemonError::Invalid(_) => StatusCode::BAD_REQUEST,
            DaemonError::Elsewhere { .. } => StatusCode::CONFLICT,
            DaemonError::PeerAnswer { .. } => StatusCode::BAD_GATEWAY,
            DaemonError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            DaemonError::Missing(_) => StatusCode::NOT_FOUND,
            DaemonError::Cluster(ClusterError::NoSuchHost(_)) => StatusCode::BAD_REQUEST,
            DaemonError::Cluster(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl IntoResponse for DaemonError {
    fn into_response(self) -> Response {
        error(self.status(), self.to_string())
    }
}

type Shared = State<Arc<Daemon>>;

/// Runs `f` (which may block: process starts, store writes, the VM's API) off the event loop.
async fn blocking<T: Send + 'static>(
    daemon: Arc<Daemon>,
    f: impl FnOnce(&Arc<Daemon>) -> Result<T, DaemonError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(move || f(&daemon)).await {
        Ok(result) => result.map_err(IntoResponse::into_response),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request handler failed: {e}"),
        )),
    }
}

fn view(daemon: &Daemon, record: VmRecord) -> VmView {
    let vm = (record.lifecycle == Lifecycle::Running)
        .then(|| {
            daemon
                .vm_request(&record.id, "GET", "/api/v1/vm", None)
                .ok()
        })
        .flatten()
        .and_then(|(status, body)| (status == 200).then_some(body));
    VmView { record, vm }
}

#[utoipa::path(get, path = "/api/v1/vms", responses((status = 200, body = [VmRecord])))]
async fn list_vms(State(d): Shared) -> Response {
    Json(d.list()).into_response()
}

#[utoipa::path(post, path = "/api/v1/vms", request_body = VmConfig, responses(
    (status = 201, body = VmRecord), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_vm(State(d): Shared, body: Result<Json<VmConfig>, JsonRejection>) -> Response {
    let Json(config) = match body {
        Ok(b) => b,
        Err(e) => return invalid_body(e),
    };
    match blocking(d, move |d| d.create(config)).await {
        Ok(record) => (StatusCode::CREATED, Json(record)).into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(get, path = "/api/v1/vms/{id}", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody)))]
async fn vm_info(State(d): Shared, Path(id): Path<String>) -> Response {
    match blocking(d, move |d| d.get(&id).map(|r| view(d, r))).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(delete, path = "/api/v1/vms/{id}", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_vm(State(d): Shared, Path(id): Path<String>) -> Response {
    match blocking(d, move |d| d.delete(&id)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/boot", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, body = VmRecord), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
    (status = 422, body = ErrorBody, description = "the VM's process did not start")))]
async fn boot_vm(State(d): Shared, Path(id): Path<String>) -> Response {
    match blocking(d, move |d| d.boot(&id)).await {
        Ok(record) => Json(record).into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/stop", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 204, description = "the VM's process ended (SIGTERM, then SIGKILL)"),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn stop_vm(State(d): Shared, Path(id): Path<String>) -> Response {
    match blocking(d, move |d| d.stop(&id)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

/// Passes a pause or resume to the VM's own API and reports its answer as the daemon's.
async fn forward(d: Arc<Daemon>, id: String, path: &'static str, kind: &'static str) -> Response {
    let result = blocking(d, move |d| {
        let record = d.running_primary(&id)?;
        let answer = d.vm_request(&record.id, "PUT", path, None)?;
        if answer.0 == 200 {
            d.events.send(DaemonEvent::new(&record.id, kind, ""));
        }
        Ok(answer)
    })
    .await;
    match result {
        Ok((status, body)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            Json(body),
        )
            .into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/pause", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, description = "the VM's own info"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn pause_vm(State(d): Shared, Path(id): Path<String>) -> Response {
    forward(d, id, "/api/v1/vm/pause", "paused").await
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/resume", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, description = "the VM's own info"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn resume_vm(State(d): Shared, Path(id): Path<String>) -> Response {
    forward(d, id, "/api/v1/vm/resume", "resumed").await
}

#[utoipa::path(get, path = "/api/v1/events", responses((status = 200, content_type = "text/event-stream",
    description = "server-sent events, one DaemonEvent (JSON) each, named by its kind")))]
async fn events(State(d): Shared) -> Response {
    let receiver = d.events.subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let event = match receiver.recv().await {
            Ok(e) => Event::default()
                .event(e.kind.clone())
                .json_data(&e)
                .unwrap_or_default(),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(format!("{n} events were missed")),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(event), receiver))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain",
    description = "Prometheus text format")))]
async fn metrics_page(State(d): Shared) -> Response {
    let result = blocking(d, |d| {
        Ok(d.list()
            .into_iter()
            .map(|r| {
                let protection = (r.lifecycle == Lifecycle::Running)
                    .then(|| {
                        d.vm_request(&r.id, "GET", "/api/v1/vm/protection", None)
                            .ok()
                    })
                    .flatten()
                    .filter(|(status, _)| *status == 200)
                    .map(|(_, status)| ProtectionFigures { status });
                (r, protection)
            })
            .collect::<Vec<_>>())
    })
    .await;
    match result {
        Ok(vms) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            metrics::render(&vms),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// A JSON answer with `status`, or the error.
fn answer(status: StatusCode, result: Result<serde_json::Value, Response>) -> Response {
    match result {
        Ok(body) => (status, Json(body)).into_response(),
        Err(r) => r,
    }
}

/// A VM's own answer passed on with its own status.
fn passed_on(result: Result<(u16, serde_json::Value), Response>) -> Response {
    match result {
        Ok((status, body)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            Json(body),
        )
            .into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/protect", request_body = ProtectVm,
    params(("id" = String, Path, description = "VM id or name")),
    responses((status = 202, description = "protection started; body is the VM's protection status"),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
    (status = 502, body = ErrorBody, description = "the peer daemon or the VM failed")))]
async fn protect_vm(
    State(d): Shared,
    Path(id): Path<String>,
    body: Result<Json<ProtectVm>, JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(b) => b,
        Err(e) => return invalid_body(e),
    };
    answer(
        StatusCode::ACCEPTED,
        blocking(d, move |d| d.protect(&id, request)).await,
    )
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/unprotect", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, description = "the final protection status"), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)))]
async fn unprotect_vm(State(d): Shared, Path(id): Path<String>) -> Response {
    answer(StatusCode::OK, blocking(d, move |d| d.unprotect(&id)).await)
}

#[utoipa::path(get, path = "/api/v1/vms/{id}/protection", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, description = "a primary's protection status, or a standby's state"),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn vm_protection(State(d): Shared, Path(id): Path<String>) -> Response {
    passed_on(blocking(d, move |d| d.protection(&id)).await)
}

/// `?force=true`: take over although the primary's death is not certain.
#[derive(serde::Deserialize, utoipa::IntoParams)]
struct FailoverParams {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/failover",
    params(("id" = String, Path, description = "VM id or name"), FailoverParams),
    responses((status = 202, description = "the standby takes over"), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "nothing committed, the primary said goodbye, or its death is not certain and `force` was not given")))]
async fn failover_vm(
    State(d): Shared,
    Path(id): Path<String>,
    Query(params): Query<FailoverParams>,
) -> Response {
    answer(
        StatusCode::ACCEPTED,
        blocking(d, move |d| d.failover(&id, params.force)).await,
    )
}

#[utoipa::path(delete, path = "/api/v1/vms/{id}/claim",
    params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, description = "the claim left by a copy that ended is removed"),
    (status = 404, body = ErrorBody, description = "no such VM, or it has no claim"),
    (status = 409, body = ErrorBody, description = "a copy of the VM runs (here or on another host), or not in cluster mode")))]
async fn release_claim(State(d): Shared, Path(id): Path<String>) -> Response {
    answer(
        StatusCode::OK,
        blocking(d, move |d| d.release_claim(&id)).await,
    )
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/migrate", request_body = MigrateVm,
    params(("id" = String, Path, description = "VM id or name")),
    responses((status = 202, description = "started; body is the migration status"),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
    (status = 502, body = ErrorBody)))]
async fn migrate_vm(
    State(d): Shared,
    Path(id): Path<String>,
    body: Result<Json<MigrateVm>, JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(b) => b,
        Err(e) => return invalid_body(e),
    };
    answer(
        StatusCode::ACCEPTED,
        blocking(d, move |d| d.migrate(&id, request)).await,
    )
}

#[utoipa::path(get, path = "/api/v1/vms/{id}/migration", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, description = "the current or last migration's status"), (status = 404, body = ErrorBody)))]
async fn vm_migration(State(d): Shared, Path(id): Path<String>) -> Response {
    answer(StatusCode::OK, blocking(d, move |d| d.migration(&id)).await)
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/migration/cancel", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, description = "cancellation requested"), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)))]
async fn cancel_migration(State(d): Shared, Path(id): Path<String>) -> Response {
    answer(
        StatusCode::OK,
        blocking(d, move |d| d.cancel_migration(&id)).await,
    )
}

/// A peer daemon's request to host a copy of one of its VMs here.
async fn host_for_peer(
    d: Arc<Daemon>,
    role: Role,
    body: Result<Json<PeerVmRequest>, JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(b) => b,
        Err(e) => return invalid_body(e),
    };
    match blocking(d, move |d| d.host_for_peer(role, request)).await {
        Ok(answer) => (StatusCode::CREATED, Json(answer)).into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(post, path = "/api/v1/peer/standbys", request_body = PeerVmRequest,
    responses((status = 201, body = PeerVmAnswer, description = "the standby listens"),
    (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn host_standby(
    State(d): Shared,
    body: Result<Json<PeerVmRequest>, JsonRejection>,
) -> Response {
    host_for_peer(d, Role::Standby, body).await
}

#[utoipa::path(post, path = "/api/v1/peer/incoming", request_body = PeerVmRequest,
    responses((status = 201, body = PeerVmAnswer, description = "the destination listens"),
    (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn host_incoming(
    State(d): Shared,
    body: Result<Json<PeerVmRequest>, JsonRejection>,
) -> Response {
    host_for_peer(d, Role::Incoming, body).await
}

#[utoipa::path(delete, path = "/api/v1/peer/vms/{id}", params(("id" = String, Path, description = "VM id")),
    responses((status = 204, description = "the copy's process was ended; its end removes it"),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn drop_peer_copy(State(d): Shared, Path(id): Path<String>) -> Response {
    match blocking(d, move |d| d.drop_for_peer(&id)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(get, path = "/api/v1/cluster/hosts", responses((status = 200, body = [ClusterHost]),
    (status = 409, body = ErrorBody, description = "not in a cluster"), (status = 502, body = ErrorBody)))]
async fn cluster_hosts(State(d): Shared) -> Response {
    match blocking(d, |d| Ok(d.cluster()?.hosts()?)).await {
        Ok(hosts) => Json(hosts).into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(get, path = "/api/v1/cluster/vms", responses((status = 200, body = [Placement]),
    (status = 409, body = ErrorBody, description = "not in a cluster"), (status = 502, body = ErrorBody)))]
async fn cluster_vms(State(d): Shared) -> Response {
    match blocking(d, |d| Ok(d.cluster()?.placements_all()?)).await {
        Ok(all) => Json(all).into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(get, path = "/api/v1/cluster/vms/{id}", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, body = Placement, description = "the host that runs it, its standby, every copy"),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn cluster_vm(State(d): Shared, Path(id): Path<String>) -> Response {
    let found = blocking(d, move |d| {
        d.cluster()?
            .placement(&id)?
            .ok_or_else(|| DaemonError::Missing(format!("no VM {id:?} in the cluster")))
    })
    .await;
    match found {
        Ok(p) => Json(p).into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/snapshot", request_body = SnapshotVm,
    params(("id" = String, Path, description = "VM id or name")),
    responses((status = 201, body = SnapshotInfo), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn snapshot_vm(
    State(d): Shared,
    Path(id): Path<String>,
    body: Result<Json<SnapshotVm>, JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(b) => b,
        Err(e) => return invalid_body(e),
    };
    match blocking(d, move |d| d.snapshot(&id, request)).await {
        Ok(info) => (StatusCode::CREATED, Json(info)).into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(get, path = "/api/v1/vms/{id}/snapshots", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, body = [SnapshotInfo]), (status = 404, body = ErrorBody)))]
async fn list_snapshots(State(d): Shared, Path(id): Path<String>) -> Response {
    match blocking(d, move |d| d.snapshots(&id)).await {
        Ok(all) => Json(all).into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(delete, path = "/api/v1/vms/{id}/snapshots/{name}", params(
    ("id" = String, Path, description = "VM id or name"), ("name" = String, Path, description = "snapshot name")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_snapshot(State(d): Shared, Path((id, name)): Path<(String, String)>) -> Response {
    match blocking(d, move |d| d.delete_snapshot(&id, &name)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(put, path = "/api/v1/vms/{id}/restore", request_body = RestoreVm,
    params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, body = VmRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 422, body = ErrorBody, description = "the restored process did not start")))]
async fn restore_vm(
    State(d): Shared,
    Path(id): Path<String>,
    body: Result<Json<RestoreVm>, JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(b) => b,
        Err(e) => return invalid_body(e),
    };
    match blocking(d, move |d| d.restore(&id, request)).await {
        Ok(record) => Json(record).into_response(),
        Err(r) => r,
    }
}

async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

async fn not_found() -> Response {
    no_such_endpoint("/openapi.json")
}

/// The daemon's router.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/api/v1/vms", get(list_vms).post(create_vm))
        .route("/api/v1/vms/{id}", get(vm_info).delete(delete_vm))
        .route("/api/v1/vms/{id}/boot", put(boot_vm))
        .route("/api/v1/vms/{id}/stop", put(stop_vm))
        .route("/api/v1/vms/{id}/pause", put(pause_vm))
        .route("/api/v1/vms/{id}/resume", put(resume_vm))
        .route("/api/v1/vms/{id}/protect", put(protect_vm))
        .route("/api/v1/vms/{id}/unprotect", put(unprotect_vm))
        .route("/api/v1/vms/{id}/protection", get(vm_protection))
        .route("/api/v1/vms/{id}/failover", put(failover_vm))
        .route("/api/v1/vms/{id}/claim", delete(release_claim))
        .route("/api/v1/vms/{id}/migrate", put(migrate_vm))
        .route("/api/v1/vms/{id}/migration", get(vm_migration))
        .route("/api/v1/vms/{id}/migration/cancel", put(cancel_migration))
        .route("/api/v1/peer/standbys", post(host_standby))
        .route("/api/v1/peer/incoming", post(host_incoming))
        .route("/api/v1/peer/vms/{id}", delete(drop_peer_copy))
        .route("/api/v1/vms/{id}/snapshot", put(snapshot_vm))
        .route("/api/v1/vms/{id}/snapshots", get(list_snapshots))
        .route("/api/v1/vms/{id}/snapshots/{name}", delete(delete_snapshot))
        .route("/api/v1/vms/{id}/restore", put(restore_vm))
        .route("/api/v1/cluster/hosts", get(cluster_hosts))
        .route("/api/v1/cluster/vms", get(cluster_vms))
        .route("/api/v1/cluster/vms/{id}", get(cluster_vm))
        .route("/api/v1/events", get(events))
        .route("/metrics", get(metrics_page))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .with_state(daemon)
}
