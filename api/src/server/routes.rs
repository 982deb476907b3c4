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
use std::sync::{Arc, Mutex};
use utoipa::{OpenApi, ToSchema};

use replication::link::LinkSecurity;
use replication::migration::{start_migration, MigrationHandle, MigrationParams, MigrationStatus};
use replication::protection::epoch_length::EpochLengthError;
use replication::protection::{
    start_protection, EpochLength, ProtectionHandle, ProtectionParams, ProtectionState,
};
use vmm::control::{ControlError, VmCommand, VmReply};
use vmm::ControlHandle;

impl ApiState {
    /// Fresh state for the VM behind `handle`.
    pub fn new(handle: ControlHandle, link: Option<LinkSecurity>) -> Self {
        Self {
            handle,
            link,
            migration: Arc::new(Mutex::new(None)),
            outcome_reported: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            protection: Arc::new(Mutex::new(None)),
            witness: Arc::new(Mutex::new(WitnessSetting::default())),
        }
    }
}

/// The witness a (re-)protection of this VM uses, and the claim this process holds there when no
/// protection of its own holds it (a standby that took over).
#[derive(Clone, Default)]
pub struct WitnessSetting {
    pub witness: Option<Arc<replication::witness::Witness>>,
    pub claim: Option<replication::witness::HeldClaim>,
}

/// What handlers share.
#[derive(Clone)]
pub struct ApiState {
    handle: ControlHandle,
    /// How this process protects the links it opens (`None`: it was given neither `--tls` nor
    /// `--insecure-plain-tcp`, so it cannot migrate).
    link: Option<LinkSecurity>,
    migration: Arc<Mutex<Option<MigrationHandle>>>,
    /// Set once a client has been told that a migration finished.
    pub(super) outcome_reported: Arc<std::sync::atomic::AtomicBool>,
    /// The epoch loop, when the VM is protected by a standby.
    pub(super) protection: Arc<Mutex<Option<ProtectionHandle>>>,
    pub(super) witness: Arc<Mutex<WitnessSetting>>,
}

/// How long a command may take (snapshots of large guests take a while).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// Body of `PUT /api/v1/vm/snapshot`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Directory to write the snapshot to (created if missing).
    #[schema(value_type = String)]
    pub dir: PathBuf,
    /// Only the pages written since this VM's previous snapshot (which becomes its base).
    #[serde(default)]
    pub diff: bool,
}

/// Body of `PUT /api/v1/vm/protect`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtectRequest {
    /// The standby's `HOST:PORT`, where `ftvmm standby` listens.
    pub standby: String,
    /// Time between checkpoints in milliseconds (default 50).
    pub epoch_ms: Option<u64>,
    /// Time between checkpoints as `ftvmm run --epoch-ms` takes it: milliseconds, `auto` or
    /// `auto:MIN-MAX`; instead of `epoch_ms`.
    pub epoch: Option<String>,
}

impl ProtectRequest {
    /// The epoch length asked for (50 ms if neither field is given).
    fn epoch_length(&self) -> Result<EpochLength, String> {
        match (self.epoch_ms, self.epoch.as_deref()) {
            (Some(_), Some(_)) => Err("give \"epoch_ms\" or \"epoch\", not both".into()),
            (Some(ms), None) => ms.to_string().parse().map_err(|e: EpochLengthError| {
                format!("\"epoch_ms\" must be 5 to 10000, got {ms} ({e})")
            }),
            (None, Some(epoch)) => epoch
                .parse()
                .map_err(|e: EpochLengthError| format!("\"epoch\": {e}")),
            (None, None) => Ok(EpochLength::Fixed(Duration::from_millis(50))),
        }
    }
}

/// Body of `PUT /api/v1/vm/migrate`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination `HOST:PORT` where `ftvmm receive` listens.
    pub to: String,
    /// Downtime target in milliseconds (default 50).
    pub downtime_ms: Option<u64>,
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
    paths(
        vm_info,
        vm_pause,
        vm_resume,
        vm_snapshot,
        vm_migrate,
        vm_migration,
        vm_migration_cancel,
        vm_protection,
        vm_protect,
        vm_unprotect
    ),
    components(schemas(
        SnapshotRequest,
        MigrateRequest,
        ProtectRequest,
        ErrorBody,
        VmInfoSchema,
        SnapshotSchema
    ))
)]
pub struct ApiDoc;

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
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
            VmReply::Vcpus(v) => Json(v).into_response(),
            VmReply::Conflict(m) => error(StatusCode::CONFLICT, m),
            VmReply::Error(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
        },
    }
}

/// VM information.
#[utoipa::path(get, path = "/api/v1/vm", responses(
    (status = 200, body = VmInfoSchema), (status = 503, body = ErrorBody)))]
async fn vm_info(State(st): State<ApiState>) -> Response {
    call(st.handle, VmCommand::Info).await
}

/// Where every vCPU is: registers, MP state and the instruction at RIP (the VM is paused for a
/// moment to look). For diagnosing a guest that seems stuck.
#[utoipa::path(get, path = "/api/v1/vm/vcpus", responses((status = 200, description = "one entry per vCPU")))]
async fn vm_vcpus(State(st): State<ApiState>) -> Response {
    call(st.handle, VmCommand::Vcpus).await
}

/// Pauses every vCPU.
#[utoipa::path(put, path = "/api/v1/vm/pause", responses(
    (status = 200, body = VmInfoSchema), (status = 409, body = ErrorBody, description = "already paused")))]
async fn vm_pause(State(st): State<ApiState>) -> Response {
    call(st.handle, VmCommand::Pause).await
}

/// Resumes a paused VM.
#[utoipa::path(put, path = "/api/v1/vm/resume", responses(
    (status = 200, body = VmInfoSchema), (status = 409, body = ErrorBody, description = "not paused")))]
async fn vm_resume(State(st): State<ApiState>) -> Response {
    call(st.handle, VmCommand::Resume).await
}

/// Writes a full snapshot (vCPUs, devices, memory) to a directory; a running VM is paused for it
/// and resumed afterwards.
#[utoipa::path(put, path = "/api/v1/vm/snapshot", request_body = SnapshotRequest, responses(
    (status = 200, body = SnapshotSchema), (status = 400, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "the guest is protected or migrating"), (status = 500, body = ErrorBody)))]
async fn vm_snapshot(
    State(st): State<ApiState>,
    body: Result<Json<SnapshotRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(req)) if req.dir.as_os_str().is_empty() => {
            error(StatusCode::BAD_REQUEST, "\"dir\" must not be empty")
        }
        Ok(Json(_)) if migration_status(&st).is_some_and(|m| !m.finished()) => error(
            StatusCode::CONFLICT,
            "a migration is in progress; take the snapshot after it ends",
        ),
        Ok(Json(req)) => {
            call(
                st.handle,
                VmCommand::Snapshot {
                    dir: req.dir,
                    diff: req.diff,
                },
            )
            .await
        }
        Err(e) => invalid_body(e),
    }
}

/// 400 for a body that is not the request's JSON (unknown fields included).
pub(crate) fn invalid_body(e: JsonRejection) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!("invalid request body: {}", e.body_text()),
    )
}

/// The 400 for a `value` (the body's `field`) that does not look like `HOST:PORT`, if it does not.
fn not_host_port(field: &str, value: &str) -> Option<Response> {
    (value.trim().is_empty() || !value.contains(':')).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            format!("\"{field}\" must be HOST:PORT, got {value:?}"),
        )
    })
}

/// The 400 for a VM started without --tls or --insecure-plain-tcp, asked to open a `purpose` link.
fn no_link(purpose: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!(
            "this VM was started without --tls DIR (or --insecure-plain-tcp), so it cannot open \
             a {purpose} link; see `ftvmm tls-certs --help`"
        ),
    )
}

/// Runs `job`, which starts a replication thread, on the event loop. `Ok` once it did; else the
/// response: 409 for a conflict, `failed` for the job's own error.
async fn start_on_event_loop(
    st: &ApiState,
    job: impl FnOnce(&mut vmm::Machine) -> VmReply + Send + 'static,
    failed: StatusCode,
) -> Result<(), Response> {
    let handle = st.handle.clone();
    let started = tokio::task::spawn_blocking(move || {
        handle.request(VmCommand::OnEventLoop(Box::new(job)), COMMAND_TIMEOUT)
    })
    .await;
    match started {
        Ok(Ok(VmReply::Done(_))) => Ok(()),
        Ok(Ok(VmReply::Conflict(m))) => Err(error(StatusCode::CONFLICT, m)),
        Ok(Ok(VmReply::Error(m))) => Err(error(failed, m)),
        Ok(Ok(other)) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected reply {other:?}"),
        )),
        Ok(Err(e)) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn migration_status(st: &ApiState) -> Option<MigrationStatus> {
    st.migration
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(MigrationHandle::status)
}

/// Starts a live migration to a destination running `ftvmm receive`; poll its progress with
/// `GET /api/v1/vm/migration`.
#[utoipa::path(put, path = "/api/v1/vm/migrate", request_body = MigrateRequest, responses(
    (status = 202, description = "started; body is the migration status"),
    (status = 400, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "a migration is in progress, or the guest is protected")))]
async fn vm_migrate(
    State(st): State<ApiState>,
    body: Result<Json<MigrateRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return invalid_body(e),
    };
    if let Some(response) = not_host_port("to", &req.to) {
        return response;
    }
    if migration_status(&st).is_some_and(|s| !s.finished()) {
        return error(StatusCode::CONFLICT, "a migration is already in progress");
    }
    let Some(security) = st.link.clone() else {
        return no_link("migration");
    };
    let mut params = MigrationParams::to(req.to, security);
    if let Some(ms) = req.downtime_ms {
        params.downtime_target = Duration::from_millis(ms);
    }
    let slot = st.migration.clone();
    let control = st.handle.clone();
    // This migration's outcome has not been read yet (an earlier one's may have been).
    st.outcome_reported
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let job =
        move |machine: &mut vmm::Machine| {
            if let Some(holder) = machine.dirty_tracking_holder() {
                return VmReply::Conflict(format!(
                "{holder} tracks the guest's dirty pages: a migration cannot start until it ends{}",
                if holder == "protection" { " (unprotect the guest first)" } else { "" }
            ));
            }
            match start_migration(machine, params, control) {
                Ok(handle) => {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
                    VmReply::Done(machine.info())
                }
                Err(e) => VmReply::Error(format!("cannot start the migration: {e}")),
            }
        };
    if let Err(response) = start_on_event_loop(&st, job, StatusCode::INTERNAL_SERVER_ERROR).await {
        return response;
    }
    match migration_status(&st) {
        Some(status) => (StatusCode::ACCEPTED, Json(status)).into_response(),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "migration did not start"),
    }
}

/// Progress of the current (or last) migration.
#[utoipa::path(get, path = "/api/v1/vm/migration", responses(
    (status = 200, description = "the migration status"), (status = 404, body = ErrorBody)))]
async fn vm_migration(State(st): State<ApiState>) -> Response {
    match migration_status(&st) {
        Some(status) => {
            if status.finished() {
                st.outcome_reported
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Json(status).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "no migration has been started"),
    }
}

/// Cancels a migration before its hand-over; the guest keeps running here.
#[utoipa::path(put, path = "/api/v1/vm/migration/cancel", responses(
    (status = 200, description = "cancellation requested"), (status = 409, body = ErrorBody)))]
async fn vm_migration_cancel(State(st): State<ApiState>) -> Response {
    let guard = st.migration.lock().unwrap_or_else(|e| e.into_inner());
    match guard.as_ref() {
        Some(m) if !m.status().finished() => {
            m.cancel();
            Json(m.status()).into_response()
        }
        _ => error(StatusCode::CONFLICT, "no migration in progress"),
    }
}

/// Protects the running guest with a hot standby (again): a guest that was never protected, one
/// that went on unprotected after losing its standby, or a standby that took over. The first
/// checkpoint is a full copy of memory; poll `GET /api/v1/vm/protection`.
#[utoipa::path(put, path = "/api/v1/vm/protect", request_body = ProtectRequest, responses(
    (status = 202, description = "protection started; body is the protection status"),
    (status = 400, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "already protected, or a migration tracks dirty pages")))]
async fn vm_protect(
    State(st): State<ApiState>,
    body: Result<Json<ProtectRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return invalid_body(e),
    };
    if let Some(response) = not_host_port("standby", &req.standby) {
        return response;
    }
    let epoch = match req.epoch_length() {
        Ok(epoch) => epoch,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let Some(security) = st.link.clone() else {
        return no_link("replication");
    };
    let previous = st
        .protection
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(p) = &previous {
        let state = p.status().state;
        if !matches!(
            state,
            ProtectionState::Degraded | ProtectionState::Unprotected
        ) {
            return error(
                StatusCode::CONFLICT,
                format!("the guest is already protected (protection is {state:?})").to_lowercase(),
            );
        }
    }
    let setting = st.witness.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // The claim this process holds: its last protection's, else the one it took over with.
    let claim = previous
        .as_ref()
        .and_then(ProtectionHandle::claim)
        .or(setting.claim);
    let params = ProtectionParams {
        standby: req.standby,
        security,
        epoch,
        witness: setting.witness,
        claim,
        checkpoint_copy: Default::default(),
    };
    let slot = st.protection.clone();
    let control = st.handle.clone();
    let job = move |machine: &mut vmm::Machine| {
        if let Some(holder) = machine.dirty_tracking_holder() {
            return VmReply::Conflict(format!(
                "{holder} tracks the guest's dirty pages: protection cannot start until it ends"
            ));
        }
        match start_protection(machine, params, control) {
            Ok(handle) => {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
                VmReply::Done(machine.info())
            }
            Err(e) => VmReply::Error(format!("cannot start protection: {e}")),
        }
    };
    if let Err(response) = start_on_event_loop(&st, job, StatusCode::BAD_REQUEST).await {
        return response;
    }
    match protection_status(&st) {
        Some(status) => (StatusCode::ACCEPTED, Json(status)).into_response(),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "protection did not start",
        ),
    }
}

/// Stops protection: the standby is told and ends without resuming the guest, which goes on here,
/// unprotected, its held output released. Answers with the final protection status.
#[utoipa::path(put, path = "/api/v1/vm/unprotect", responses(
    (status = 200, description = "protection stopped; body is the protection status"),
    (status = 409, body = ErrorBody, description = "the guest is not protected")))]
async fn vm_unprotect(State(st): State<ApiState>) -> Response {
    let handle = st
        .protection
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(handle) = handle else {
        return error(StatusCode::CONFLICT, "the guest is not protected");
    };
    let state = handle.status().state;
    if matches!(
        state,
        ProtectionState::Degraded | ProtectionState::Unprotected
    ) {
        return error(
            StatusCode::CONFLICT,
            format!("the guest is not protected (protection is {state:?})").to_lowercase(),
        );
    }
    let stopped = tokio::task::spawn_blocking(move || {
        let finished = handle.unprotect(COMMAND_TIMEOUT);
        (finished, handle.status())
    })
    .await;
    match stopped {
        Ok((true, status)) => Json(status).into_response(),
        Ok((false, _)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "protection is stopping but has not finished; see GET /api/v1/vm/protection",
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Protection by a hot standby: state, last committed epoch, the last checkpoint's pause, pages and
/// commit latency.
#[utoipa::path(get, path = "/api/v1/vm/protection", responses(
    (status = 200, description = "the protection status"), (status = 404, body = ErrorBody)))]
async fn vm_protection(State(st): State<ApiState>) -> Response {
    match protection_status(&st) {
        Some(s) => Json(s).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "the VM is not protected (start it with --standby)",
        ),
    }
}

/// The status of this VM's protection (its last one, if it ended), if it was ever protected.
fn protection_status(st: &ApiState) -> Option<replication::protection::ProtectionStatus> {
    st.protection
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(ProtectionHandle::status)
}

async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

async fn not_found() -> Response {
    no_such_endpoint("/api/v1/openapi.json")
}

/// The 404 for a path no route serves, pointing at the API's description.
pub(crate) fn no_such_endpoint(openapi_path: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint; see GET {openapi_path}"),
    )
}

/// The API's router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/vm", get(vm_info))
        .route("/api/v1/vm/vcpus", get(vm_vcpus))
        .route("/api/v1/vm/protection", get(vm_protection))
        .route("/api/v1/vm/unprotect", put(vm_unprotect))
        .route("/api/v1/vm/protect", put(vm_protect))
        .route("/api/v1/vm/pause", put(vm_pause))
        .route("/api/v1/vm/resume", put(vm_resume))
        .route("/api/v1/vm/snapshot", put(vm_snapshot))
        .route("/api/v1/vm/migrate", put(vm_migrate))
        .route("/api/v1/vm/migration", get(vm_migration))
        .route("/api/v1/vm/migration/cancel", put(vm_migration_cancel))
        .route("/api/v1/openapi.json", get(openapi))
        .fallback(not_found)
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(epoch_ms: Option<u64>, epoch: Option<&str>) -> ProtectRequest {
        ProtectRequest {
            standby: "10.0.0.2:7100".into(),
            epoch_ms,
            epoch: epoch.map(String::from),
        }
    }

    #[test]
    fn the_epoch_is_a_number_or_auto_and_bad_ones_are_named() {
        let ms = |v| EpochLength::Fixed(Duration::from_millis(v));
        assert_eq!(request(None, None).epoch_length(), Ok(ms(50)));
        assert_eq!(request(Some(20), None).epoch_length(), Ok(ms(20)));
        assert_eq!(request(None, Some("30")).epoch_length(), Ok(ms(30)));
        assert!(matches!(
            request(None, Some("auto:10-40")).epoch_length(),
            Ok(EpochLength::Adaptive { .. })
        ));
        let err = request(Some(2), None).epoch_length().unwrap_err();
        assert!(
            err.contains("\"epoch_ms\" must be 5 to 10000, got 2"),
            "{err}"
        );
        let err = request(None, Some("soon")).epoch_length().unwrap_err();
        assert!(err.contains("\"soon\""), "{err}");
        let err = request(Some(20), Some("auto")).epoch_length().unwrap_err();
        assert!(err.contains("not both"), "{err}");
    }
}
