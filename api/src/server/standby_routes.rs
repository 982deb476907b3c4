//! The API of a standby while it follows its primary (`ftvmm standby --api-socket PATH`): its
//! state, and failover on the operator's word. Once it takes over, the same socket serves the full
//! VM API (`routes.rs`).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use replication::protection::StandbyControl;

use super::routes::ErrorBody;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// The standby's state: its primary, the checkpoint it would resume from, whether the primary
/// answers heartbeats.
async fn standby_status(State(control): State<StandbyControl>) -> Response {
    Json(control.status()).into_response()
}

/// `?force=true`: the operator knows the primary is dead although it may look alive or merely
/// silent.
#[derive(serde::Deserialize)]
struct FailoverParams {
    #[serde(default)]
    force: bool,
}

/// The operator says the primary is dead: take over from the last committed checkpoint. With a
/// witness, the witness must still agree (a live primary keeps its claim until it loses it).
/// Unless the primary's death is certain, only with `?force=true`.
async fn failover(
    State(control): State<StandbyControl>,
    Query(params): Query<FailoverParams>,
) -> Response {
    match control.force_failover(params.force) {
        Ok(()) => (StatusCode::ACCEPTED, Json(control.status())).into_response(),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn not_here() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "this ftvmm is a standby: it serves GET /api/v1/standby and PUT /api/v1/standby/failover \
         until it takes over",
    )
}

pub fn router(control: StandbyControl) -> Router {
    Router::new()
        .route("/api/v1/standby", get(standby_status))
        .route("/api/v1/standby/failover", put(failover))
        .fallback(not_here)
        .with_state(control)
}
