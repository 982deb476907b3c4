//! Routes of the control API and their OpenAPI description.

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};
use vmm::control::{ControlError, VmCommand, VmReply};
use vmm::ControlHandle;

/// How long a command may take (snapshots of large guests take a while).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// Body of `PUT /api/v1/vm/snapshot`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct SnapshotRequest {
    /// Directory to write the snapshot to (created if missing).
    #[schema(value_type = String)]
    pub dir: PathBuf,
}

/// Every error response.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// VM information (mirrors `vmm::VmInfo`).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct VmInfoSchema {
    /// `running` or `paused`.
    pub state: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<String>,
    pub nets: Vec<String>,
    pub emulated_instructions: u64,
}

/// Snapshot result (mirrors `vmm::control::SnapshotReport`).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct SnapshotSchema {
    pub dir: String,
    /// How long the vCPUs were paused.
    pub paused_ms: f64,
    /// Bytes of non-zero guest memory written.
    pub memory_bytes: u64,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ftvmm VM control API",
        description = "Per-VM control over a Unix socket."
    ),
    paths(vm_info, vm_pause, vm_resume, vm_snapshot),
    components(schemas(SnapshotRequest, ErrorBody, VmInfoSchema, SnapshotSchema))
)]
pub struct ApiDoc;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

async fn call(handle: ControlHandle, command: VmCommand) -> Response {
    let result =
        tokio::task::spawn_blocking(move || handle.request(command, COMMAND_TIMEOUT)).await;
    match result {
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("API worker failed: {e}"),
        ),
        Ok(Err(ControlError::Gone)) => error(StatusCode::SERVICE_UNAVAILABLE, "the VM has stopped"),
        Ok(Err(e @ ControlError::Timeout(_))) => error(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
        Ok(Ok(reply)) => match reply {
            VmReply::Info(info) | VmReply::Done(info) => Json(info).into_response(),
            VmReply::Snapshot(report) => Json(report).into_response(),
            VmReply::Conflict(m) => error(StatusCode::CONFLICT, m),
            VmReply::Error(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
        },
    }
}

/// VM information.
#[utoipa::path(get, path = "/api/v1/vm", responses(
    (status = 200, body = VmInfoSchema), (status = 503, body = ErrorBody)))]
async fn vm_info(State(handle): State<ControlHandle>) -> Response {
    call(handle, VmCommand::Info).await
}

/// Pauses every vCPU.
#[utoipa::path(put, path = "/api/v1/vm/pause", responses(
    (status = 200, body = VmInfoSchema), (status = 409, body = ErrorBody, description = "already paused")))]
async fn vm_pause(State(handle): State<ControlHandle>) -> Response {
    call(handle, VmCommand::Pause).await
}

/// Resumes a paused VM.
#[utoipa::path(put, path = "/api/v1/vm/resume", responses(
    (status = 200, body = VmInfoSchema), (status = 409, body = ErrorBody, description = "not paused")))]
async fn vm_resume(State(handle): State<ControlHandle>) -> Response {
    call(handle, VmCommand::Resume).await
}

/// Writes a full snapshot (vCPUs, devices, memory) to a directory; a running VM is paused for it
/// and resumed afterwards.
#[utoipa::path(put, path = "/api/v1/vm/snapshot", request_body = SnapshotRequest, responses(
    (status = 200, body = SnapshotSchema), (status = 400, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn vm_snapshot(
    State(handle): State<ControlHandle>,
    body: Result<Json<SnapshotRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(req)) if req.dir.as_os_str().is_empty() => {
            error(StatusCode::BAD_REQUEST, "\"dir\" must not be empty")
        }
        Ok(Json(req)) => call(handle, VmCommand::Snapshot { dir: req.dir }).await,
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {}", e.body_text()),
        ),
    }
}

async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; see GET /api/v1/openapi.json",
    )
}

/// The API's router.
pub fn router(handle: ControlHandle) -> Router {
    Router::new()
        .route("/api/v1/vm", get(vm_info))
        .route("/api/v1/vm/pause", put(vm_pause))
        .route("/api/v1/vm/resume", put(vm_resume))
        .route("/api/v1/vm/snapshot", put(vm_snapshot))
        .route("/api/v1/openapi.json", get(openapi))
        .fallback(not_found)
        .with_state(handle)
}
