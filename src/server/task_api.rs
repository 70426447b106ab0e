//! `POST /api/v1/task/{id}/run`: starts one execution of a task now through `api.run_task` (the
//! task's id or name), in the REST envelope and with the bearer tokens of [`super::api`]. The
//! daemon's scheduler fans the execution out; `data` carries its run id.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

use super::envelope::{self, ErrorKind, Failure};
use super::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route(
        "/api/v1/task/:id/run",
        post(run).fallback(envelope::method_not_allowed),
    )
}

/// The path's entry in the OpenAPI document (see [`super::openapi`]).
pub fn openapi_path() -> Value {
    let failure = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}});
    json!({
        "post": {
            "summary": "Start one execution of a task now (api.run_task); the daemon fans it out",
            "parameters": [{
                "name": "id", "in": "path", "required": true,
                "schema": {"type": "string"},
                "description": "The task's id (uuid) or name"
            }],
            "responses": {
                "200": {
                    "description": "Started; data.run is the execution's id (api.task_runs.id), data.task the task",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
                },
                "400": failure("The task has run its maximum number of times (40002)"),
                "401": failure("Missing or wrong bearer token (40101)"),
                "404": failure("No such task (40401)"),
                "500": failure("The database refused the request (50001)"),
                "503": failure("The database is unavailable (50301)")
            }
        }
    })
}

async fn run(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(f) = super::api::authorized(&headers, &st.tokens) {
        return f.into_response();
    }
    if id.len() > 512 || id.contains('\0') {
        return Failure::new(ErrorKind::Invalid, "the task id is not valid").into_response();
    }
    let result = st
        .db
        .timed("api run task", async {
            let c = st.db.pool().get().await?;
            Ok(c.query_one("SELECT api.run_task($1::text)", &[&id])
                .await?
                .get::<_, i64>(0))
        })
        .await;
    match result {
        Ok(run) => envelope::ok(json!({"run": run, "task": id}), 1),
        Err(e) => match e.code().as_deref() {
            Some("ERR-400-060") => Failure::new(ErrorKind::NotFound, e.to_string()),
            Some(c) if c.starts_with("ERR-400") => Failure::new(ErrorKind::Invalid, e.to_string()),
            Some(_) => {
                tracing::error!(error = %e, "REST task run failed");
                Failure::new(ErrorKind::Database, "the database refused the request")
            }
            None => {
                tracing::warn!(error = %e, "REST task run: database unavailable");
                Failure::new(ErrorKind::Unavailable, "the database is unavailable")
            }
        }
        .into_response(),
    }
}
