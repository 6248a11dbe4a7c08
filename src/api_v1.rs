//! The customer API (`/v1`): purges, with bearer-token auth and JSON problem details.
//!
//! A device that does not exist and a device owned by someone else get the same 404, so
//! the API never reveals whether an IMEI is known. Denials are audited. Handlers never log
//! the IMEI from a request body.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::audit::{self, AuditEvent};
use crate::pseudonym::{Imei, KeyRing, Pseudonym};
use crate::purge::{PurgeError, PurgeRequest, Purger, Receipt};
use crate::registry::Registry;

type Conn = crate::redis_conn::RedisConn;

/// What the `/v1` handlers share.
#[derive(Clone, Debug)]
pub struct V1State {
    pub registry: Registry<Conn>,
    pub purger: Purger<Conn>,
    pub keys: Arc<KeyRing>,
    pub audit_conn: Conn,
    /// Retention: exports never return anything older than the owner's retention.
    pub retention: crate::retention::Retention,
    /// Entries an export reads per Redis call (`http.export_chunk_entries`).
    pub export_chunk_entries: usize,
    /// `storage.future_fix_tolerance_s`, for reading tail entries.
    pub future_tolerance_s: i64,
}

/// The OpenAPI document of the `/v1` API (served at `/openapi.json`, checked in as
/// `docs/openapi.json`).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "trackgate privacy API", description = "Purge and export of a customer's own devices' location data."),
    paths(
        create_purge, get_purge, export_fixes, set_device_state,
        crate::api_admin::add_customer, crate::api_admin::set_holidays, crate::api_admin::issue_token,
        crate::api_admin::revoke_token, crate::api_admin::assign, crate::api_admin::unassign,
        crate::api_admin::audit_trail, crate::api_admin::set_device_state
    ),
    components(schemas(PurgeBody, ExportBody, Receipt, Problem, DeviceState, crate::collection::Collection, crate::api_admin::NewCustomer, crate::api_admin::IssuedToken, crate::api_admin::Owner, crate::api_admin::Device)),
    modifiers(&BearerAuth)
)]
#[derive(Debug)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// The `/v1` routes.
pub fn router(state: V1State) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/v1/purges", post(create_purge))
        .route("/v1/purges/{id}", get(get_purge))
        .route("/v1/exports", post(export_fixes))
        .route("/v1/devices/{imei}/fixes", get(imei_in_url))
        .route("/v1/devices/state", post(set_device_state))
        .with_state(state)
}

/// An RFC 9457 problem with a stable `code`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

pub(crate) fn problem(
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: Option<String>,
) -> Response {
    let body = Problem {
        kind: "about:blank",
        title,
        status: status.as_u16(),
        code,
        detail,
    };
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

/// The routes that used to take an IMEI in the URL answer 410 and name their successor
/// (a URL is logged by every proxy on the way, so the IMEI moved to the body). The path
/// is neither read nor logged here.
pub(crate) async fn imei_in_url() -> Response {
    problem(
        StatusCode::GONE,
        "imei_in_url",
        "IMEIs are not accepted in URLs",
        Some(
            "send the IMEI in the body: POST /v1/exports {imei, from, to, format}; \
             POST /v1/admin/owners/assign {imei, customer}; POST /v1/admin/owners/unassign {imei}"
                .into(),
        ),
    )
}

/// The IMEI of a request body, or the `400 bad_imei` answer (which never echoes it).
#[allow(clippy::result_large_err)] // the early response of a cold path, as in api_admin
pub(crate) fn imei_from_body(imei: &str) -> Result<Imei, Response> {
    Imei::new(imei).ok_or_else(|| {
        problem(
            StatusCode::BAD_REQUEST,
            "bad_imei",
            "imei must be 14-15 digits",
            None,
        )
    })
}

fn not_found() -> Response {
    problem(StatusCode::NOT_FOUND, "not_found", "Not found", None)
}

pub(crate) fn unavailable_response(detail: &str) -> Response {
    unavailable(detail)
}

fn unavailable(detail: &str) -> Response {
    let mut r = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Temporarily unavailable; retry",
        Some(detail.into()),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

async fn caller(state: &V1State, headers: &HeaderMap) -> Result<String, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let unauthorized = || {
        problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing or invalid bearer token",
            None,
        )
    };
    let Some(token) = token else {
        return Err(unauthorized());
    };
    match state.registry.authenticate(token).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(unauthorized()),
        Err(_) => Err(unavailable("token store unreachable")),
    }
}

/// The caller's device behind `imei`, with its pseudonyms under every key version. A
/// device that is unknown or owned by someone else gets the same 404, and the attempt is
/// audited as `action` denied.
/// A device the caller owns: its pseudonyms (every key version) and since when it is
/// theirs (Unix ms, if recorded).
struct Owned {
    pseudonyms: Vec<Pseudonym>,
    since_ms: Option<i64>,
}

async fn owned_device(
    state: &V1State,
    customer_id: &str,
    imei: &Imei,
    action: &str,
) -> Result<Owned, Response> {
    let pseudonyms = state.keys.all_pseudonyms(imei);
    let ownership = state
        .registry
        .ownership(imei, &state.keys)
        .await
        .map_err(|_| unavailable("registry unreachable"))?;
    if let Some((owner, since_ms)) = ownership
        && owner == customer_id
    {
        return Ok(Owned {
            pseudonyms,
            since_ms,
        });
    }
    let devices: Vec<&str> = pseudonyms.iter().map(|p| p.as_str()).collect();
    let mut conn = state.audit_conn.clone();
    let _ = audit::append(
        &mut conn,
        &AuditEvent {
            actor: &format!("customer:{customer_id}"),
            action,
            devices: &devices.join(","),
            outcome: "denied",
            detail: "not the owner (or unknown device)",
        },
    )
    .await;
    Err(not_found())
}

/// `POST /v1/devices/state` body (and the admin's `POST /v1/admin/devices/state`).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// The device's IMEI (14-15 digits).
    pub imei: String,
    /// `active` (stored), `paused` (acknowledged, not stored); `blocked` (connection
    /// closed) is the admin's alone.
    pub state: crate::collection::Collection,
}

#[utoipa::path(
    post,
    path = "/v1/devices/state",
    request_body = DeviceState,
    responses(
        (status = 200, description = "The state is set; every gateway's open connections follow within retention.owner_refresh_s", body = DeviceState),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`blocked` is set and lifted by the admin only", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed authentications from this address", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Redis unreachable; nothing changed; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
/// Pause or resume collection for one of the caller's devices: a paused device's frames
/// are acknowledged as usual and nothing is stored.
async fn set_device_state(
    State(state): State<V1State>,
    headers: HeaderMap,
    body: Result<Json<DeviceState>, axum::extract::rejection::JsonRejection>,
) -> Response {
    use crate::collection::{self, Collection};
    let customer_id = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Ok(Json(body)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Body must be JSON {imei, state: active|paused}",
            None,
        );
    };
    let imei = match imei_from_body(&body.imei) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let action = match body.state {
        Collection::Paused => "device.pause",
        _ => "device.resume",
    };
    let pseudonyms = match owned_device(&state, &customer_id, &imei, action).await {
        Ok(o) => o.pseudonyms,
        Err(r) => return r,
    };
    let mut conn = state.audit_conn.clone();
    let current = match collection::state_of(&mut conn, &pseudonyms).await {
        Ok(c) => c,
        Err(_) => return unavailable("Redis unreachable"),
    };
    if body.state == Collection::Blocked || current == Collection::Blocked {
        return problem(
            StatusCode::FORBIDDEN,
            "blocked_by_admin",
            "Blocking is set and lifted by the operator only",
            None,
        );
    }
    let change = CustomerStateChange {
        customer_id: &customer_id,
        pseudonyms: &pseudonyms,
        to: body.state,
        action,
        detail: body.state.as_str(),
    };
    match change.apply(&mut conn).await {
        Ok(Some(true)) => (StatusCode::OK, Json(body)).into_response(),
        // Blocked meanwhile: the block stands.
        Ok(Some(false)) => problem(
            StatusCode::FORBIDDEN,
            "blocked_by_admin",
            "Blocking is set and lifted by the operator only",
            None,
        ),
        Ok(None) => unavailable("audit trail unreachable; nothing changed"),
        Err(_) => unavailable("Redis unreachable"),
    }
}

/// A customer's change of its device's collection state, audited before it is made.
struct CustomerStateChange<'a> {
    customer_id: &'a str,
    pseudonyms: &'a [Pseudonym],
    to: crate::collection::Collection,
    action: &'a str,
    detail: &'a str,
}

impl CustomerStateChange<'_> {
    /// Audit, then set: `None` when the audit line could not be written (nothing
    /// changed), `Some(false)` when the device is blocked (the block stands).
    async fn apply(
        &self,
        conn: &mut crate::redis_conn::RedisConn,
    ) -> redis::RedisResult<Option<bool>> {
        let devices: Vec<&str> = self.pseudonyms.iter().map(|p| p.as_str()).collect();
        let event = AuditEvent {
            actor: &format!("customer:{}", self.customer_id),
            action: self.action,
            devices: &devices.join(","),
            outcome: "ok",
            detail: self.detail,
        };
        if audit::append(conn, &event).await.is_err() {
            return Ok(None);
        }
        let set = crate::collection::set(
            conn,
            self.pseudonyms,
            self.to,
            crate::collection::By::Customer,
        );
        set.await.map(Some)
    }
}

/// `POST /v1/purges` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeBody {
    /// The device's IMEI (14-15 digits).
    pub imei: String,
    /// Fix-time range (RFC 3339, inclusive); both or neither.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub from: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub to: Option<Timestamp>,
    /// Also pause collection for the device (as `POST /v1/devices/state`), before the purge
    /// runs: nothing it sends afterwards is stored until it is resumed.
    #[serde(default)]
    pub pause: bool,
}

/// Request a purge of one of the caller's devices (whole, or a fix-time range).
#[utoipa::path(
    post,
    path = "/v1/purges",
    request_body = PurgeBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeat-safe request key")),
    responses(
        (status = 200, description = "Purge completed", body = Receipt),
        (status = 202, description = "Purge journaled; the worker completes it by the deadline", body = Receipt),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed authentications from this address", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Idempotency-Key already used for another purge, or no business day to set the deadline by; nothing done", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Journal unreachable; nothing done; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn create_purge(
    State(state): State<V1State>,
    headers: HeaderMap,
    body: Result<Json<PurgeBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let customer_id = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Ok(Json(body)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Body must be JSON {imei, from?, to?}",
            None,
        );
    };
    let imei = match imei_from_body(&body.imei) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let range = match (body.from, body.to) {
        (None, None) => None,
        (Some(f), Some(t)) if f <= t => Some((f, t)),
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                "bad_range",
                "from and to must both be given, from <= to",
                None,
            );
        }
    };
    let pseudonyms = match owned_device(&state, &customer_id, &imei, "purge.requested").await {
        Ok(o) => o.pseudonyms,
        Err(r) => return r,
    };
    let customer = match state.registry.customer(&customer_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return not_found(),
        Err(_) => return unavailable("registry unreachable"),
    };
    if body.pause {
        let mut conn = state.audit_conn.clone();
        let change = CustomerStateChange {
            customer_id: &customer_id,
            pseudonyms: &pseudonyms,
            to: crate::collection::Collection::Paused,
            action: "device.pause",
            detail: "with a purge request",
        };
        // Only an active device is paused: a paused one already is, and a blocked one
        // stays blocked (only the operator lifts that).
        let paused = match crate::collection::state_of(&mut conn, &pseudonyms).await {
            Ok(crate::collection::Collection::Active) => change.apply(&mut conn).await,
            Ok(_) => Ok(Some(true)),
            Err(e) => Err(e),
        };
        if !matches!(paused, Ok(Some(_))) {
            return unavailable("could not pause the device; nothing was done");
        }
    }
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let req = PurgeRequest {
        pseudonyms,
        range,
        idempotency_key,
    };
    match state.purger.request(&customer, &req).await {
        Ok(r) => {
            let status = if r.state == "completed" {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            (status, Json(r)).into_response()
        }
        Err(PurgeError::Unavailable(_)) => {
            unavailable("purge journal unreachable; nothing was done")
        }
        Err(PurgeError::Range) => problem(
            StatusCode::BAD_REQUEST,
            "bad_range",
            "from must not be after to",
            None,
        ),
        Err(e @ PurgeError::IdempotencyConflict(_)) => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "Idempotency-Key already used for another purge; use a new key for a new request",
            Some(e.to_string()),
        ),
        Err(e @ PurgeError::Calendar(_)) => {
            tracing::error!(error = %e, customer = %customer_id, "purge refused: no deadline can be set");
            problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "no_business_days",
                "The customer's business calendar leaves no day to set the deadline by; nothing was journaled",
                Some(e.to_string()),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "purge request failed after journaling");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Purge journaled but not reported; poll GET /v1/purges",
                None,
            )
        }
    }
}

/// A purge receipt.
#[utoipa::path(
    get,
    path = "/v1/purges/{id}",
    params(("id" = String, Path, description = "Purge id")),
    responses(
        (status = 200, description = "The receipt", body = Receipt),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed authentications from this address", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such purge of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn get_purge(
    State(state): State<V1State>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let customer_id = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match state.purger.receipt(&id).await {
        Ok(Some(r)) if r.customer == customer_id => {
            (StatusCode::OK, Json::<Receipt>(r)).into_response()
        }
        Ok(_) => not_found(),
        Err(_) => unavailable("purge journal unreachable"),
    }
}

/// `POST /v1/exports` body. The IMEI travels in the body, never in the URL: proxies,
/// load balancers and access logs record URLs, and DESIGN §4 allows a raw IMEI only in
/// an authorised request's body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportBody {
    /// The device's IMEI (14-15 digits).
    pub imei: String,
    /// Earliest fix time (RFC 3339, inclusive).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub from: Option<Timestamp>,
    /// Latest fix time (RFC 3339, inclusive).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub to: Option<Timestamp>,
    /// `ndjson` (default), `csv` or `geojson`.
    pub format: Option<String>,
}

/// Stream the location history of one of the caller's devices.
#[utoipa::path(
    post,
    path = "/v1/exports",
    request_body = ExportBody,
    responses(
        (status = 200, description = "The fixes, oldest first (NDJSON; CSV or GeoJSON per `format`)", body = String, content_type = "application/x-ndjson"),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed authentications from this address", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn export_fixes(
    State(state): State<V1State>,
    headers: HeaderMap,
    body: Result<Json<ExportBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let customer_id = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Ok(Json(params)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Body must be JSON {imei, from?, to? (RFC 3339), format?}",
            None,
        );
    };
    let Some(format) = crate::export::Format::parse(params.format.as_deref().unwrap_or("ndjson"))
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_format",
            "format must be ndjson, csv or geojson",
            None,
        );
    };
    let imei = match imei_from_body(&params.imei) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let Owned {
        pseudonyms,
        since_ms,
    } = match owned_device(&state, &customer_id, &imei, "export").await {
        Ok(o) => o,
        Err(r) => return r,
    };
    // The customer's retention bounds what may be read; unknown means no export (the
    // default could be longer than what they agreed to).
    let ttl = {
        let mut conn = state.audit_conn.clone();
        match state
            .retention
            .ttl_for_customer(&mut conn, &customer_id)
            .await
        {
            Ok(ttl) => ttl,
            Err(_) => {
                return unavailable("retention unknown (Redis unreachable); export not started");
            }
        }
    };
    let devices: Vec<&str> = pseudonyms.iter().map(|p| p.as_str()).collect();
    let mut conn = state.audit_conn.clone();
    let event = AuditEvent {
        actor: &format!("customer:{customer_id}"),
        action: "export",
        devices: &devices.join(","),
        outcome: "ok",
        detail: "",
    };
    if audit::append(&mut conn, &event).await.is_err() {
        return unavailable("audit trail unreachable; export not started");
    }
    let q = crate::export::ExportQuery {
        pseudonyms,
        from: params.from,
        to: params.to,
        ttl,
        owned_since_ms: since_ms,
        format,
        chunk_entries: state.export_chunk_entries,
        future_tolerance_s: state.future_tolerance_s,
        vault: state.keys.vault().clone(),
    };
    let body = axum::body::Body::from_stream(crate::export::stream(state.audit_conn.clone(), q));
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    r
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi;

    /// The checked-in document is what the code generates. Regenerate with
    /// `TRACKGATE_UPDATE_OPENAPI=1 cargo test --lib openapi`.
    #[test]
    fn openapi_document_is_checked_in() {
        let doc = super::ApiDoc::openapi().to_pretty_json().unwrap() + "\n";
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
        if std::env::var_os("TRACKGATE_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &doc).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == doc,
            "docs/openapi.json is stale: regenerate (see the test's doc)"
        );
    }
}
