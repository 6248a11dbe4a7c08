//! The admin API (`/v1/admin/…`, `/v1/audit`): customers, holidays, tokens, device
//! ownership and the audit trail, behind a separate admin token (its SHA-256 in the
//! configuration, compared in constant time). Every change is audited as actor `admin`.

// Helpers return the early HTTP response as their error; its size is irrelevant on this
// cold path and boxing it would only add noise.
#![allow(clippy::result_large_err)]

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api_v1::{V1State, problem};
use crate::audit::{self, AUDIT_KEY};
use crate::pseudonym::Imei;
use crate::registry::{Customer, RegistryError, parse_weekday};

/// Admin routes; `admin_sha256` is the hex SHA-256 of the admin token.
pub fn router(state: V1State, admin_sha256: String) -> Router {
    Router::new()
        .route("/v1/admin/customers", post(add_customer))
        .route("/v1/admin/customers/{id}/holidays", put(set_holidays))
        .route("/v1/admin/customers/{id}/tokens", post(issue_token))
        .route(
            "/v1/admin/customers/{id}/tokens/{tid}",
            delete(revoke_token),
        )
        .route("/v1/admin/owners/assign", post(assign))
        .route("/v1/admin/owners/unassign", post(unassign))
        .route(
            "/v1/admin/devices/{imei}/owner",
            put(crate::api_v1::imei_in_url).delete(crate::api_v1::imei_in_url),
        )
        .route("/v1/audit", get(audit_trail))
        .route("/v1/admin/devices/state", post(set_device_state))
        .with_state(AdminState {
            v1: state,
            admin_sha256,
        })
}

#[derive(Clone, Debug)]
struct AdminState {
    v1: V1State,
    admin_sha256: String,
}

fn authorized(state: &AdminState, headers: &HeaderMap) -> Result<(), Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| hex::encode(Sha256::digest(t.as_bytes())))
        .unwrap_or_default();
    let ok: bool = given.as_bytes().ct_eq(state.admin_sha256.as_bytes()).into();
    if ok {
        Ok(())
    } else {
        Err(problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Admin token required",
            None,
        ))
    }
}

fn registry_error(e: RegistryError) -> Response {
    match e {
        RegistryError::Redis(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Redis unreachable; retry",
            None,
        ),
        RegistryError::Exists(_) => {
            problem(StatusCode::CONFLICT, "exists", "Customer exists", None)
        }
        RegistryError::NoCustomer(_) => {
            problem(StatusCode::NOT_FOUND, "not_found", "Not found", None)
        }
        other => problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Invalid request",
            Some(other.to_string()),
        ),
    }
}

async fn audited(
    state: &AdminState,
    action: &str,
    devices: &str,
    detail: &str,
) -> Result<(), Response> {
    let mut conn = state.v1.audit_conn.clone();
    audit::admin(&mut conn, action, devices, detail)
        .await
        .map_err(|_| {
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Audit trail unreachable",
                None,
            )
        })
}

/// `POST /v1/admin/customers` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCustomer {
    pub id: String,
    pub name: String,
    /// IANA time zone.
    pub tz: String,
    /// e.g. ["sat", "sun"] (the default).
    pub weekend: Option<Vec<String>>,
    /// Dates YYYY-MM-DD.
    pub holidays: Option<Vec<String>>,
    pub retention_s: Option<u64>,
}

fn dates(list: &[String]) -> Result<Vec<Date>, Response> {
    list.iter()
        .map(|d| d.parse::<Date>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            problem(
                StatusCode::BAD_REQUEST,
                "bad_date",
                "Dates must be YYYY-MM-DD",
                None,
            )
        })
}

#[utoipa::path(post, path = "/v1/admin/customers", request_body = NewCustomer,
    responses((status = 201, description = "Created"), (status = 400, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 401, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 429, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 409, body = crate::api_v1::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn add_customer(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<NewCustomer>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    let Ok(Json(b)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Body must be a customer object",
            None,
        );
    };
    let mut c = Customer::new(&b.id, &b.name, &b.tz);
    if let Some(w) = &b.weekend {
        match w
            .iter()
            .map(|d| parse_weekday(d))
            .collect::<Option<Vec<_>>>()
        {
            Some(days) => c.weekend = days,
            None => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "bad_weekday",
                    "Weekdays: mon..sun",
                    None,
                );
            }
        }
    }
    if let Some(h) = &b.holidays {
        match dates(h) {
            Ok(d) => c.holidays = d,
            Err(r) => return r,
        }
    }
    c.retention_s = b.retention_s;
    if let Err(e) = s.v1.registry.add_customer(&c).await {
        return registry_error(e);
    }
    if let Err(r) = audited(&s, "customer.add", "", &format!("customer {}", c.id)).await {
        return r;
    }
    StatusCode::CREATED.into_response()
}

#[utoipa::path(put, path = "/v1/admin/customers/{id}/holidays", request_body = Vec<String>, params(("id" = String, Path)),
    responses((status = 204, description = "Replaced"), (status = 400, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 401, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 429, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 404, body = crate::api_v1::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn set_holidays(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Vec<String>>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    let Ok(Json(list)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Body must be a list of dates",
            None,
        );
    };
    let days = match dates(&list) {
        Ok(d) => d,
        Err(r) => return r,
    };
    if let Err(e) = s.v1.registry.set_holidays(&id, &days).await {
        return registry_error(e);
    }
    match audited(
        &s,
        "customer.holidays",
        "",
        &format!("customer {id}: {} holidays", days.len()),
    )
    .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

/// A newly issued token: shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedToken {
    pub id: String,
    pub token: String,
}

#[utoipa::path(post, path = "/v1/admin/customers/{id}/tokens", params(("id" = String, Path)),
    responses((status = 201, body = IssuedToken), (status = 401, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 429, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 404, body = crate::api_v1::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn issue_token(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    let (tid, token) = match s.v1.registry.issue_token(&id).await {
        Ok(t) => t,
        Err(e) => return registry_error(e),
    };
    if let Err(r) = audited(&s, "token.issue", "", &format!("customer {id} token {tid}")).await {
        // Not audited: take it back rather than hand out an unrecorded credential.
        let _ = s.v1.registry.revoke_token(&id, &tid).await;
        return r;
    }
    (StatusCode::CREATED, Json(IssuedToken { id: tid, token })).into_response()
}

#[utoipa::path(delete, path = "/v1/admin/customers/{id}/tokens/{tid}", params(("id" = String, Path), ("tid" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 401, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 429, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 404, body = crate::api_v1::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn revoke_token(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path((id, tid)): Path<(String, String)>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    match s.v1.registry.revoke_token(&id, &tid).await {
        Ok(true) => match audited(
            &s,
            "token.revoke",
            "",
            &format!("customer {id} token {tid}"),
        )
        .await
        {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(r) => r,
        },
        Ok(false) => problem(StatusCode::NOT_FOUND, "not_found", "Not found", None),
        Err(e) => registry_error(e),
    }
}

/// `POST /v1/admin/owners/assign` body (the IMEI in the body, not the URL: see
/// [`crate::api_v1::ExportBody`]).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    /// The device's IMEI (14-15 digits).
    pub imei: String,
    pub customer: String,
}

/// `POST /v1/admin/owners/unassign` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The device's IMEI (14-15 digits).
    pub imei: String,
}

fn device(s: &AdminState, imei: &str) -> Result<(Imei, String), Response> {
    let imei = crate::api_v1::imei_from_body(imei)?;
    let devices =
        s.v1.keys
            .all_pseudonyms(&imei)
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
    Ok((imei, devices))
}

#[utoipa::path(post, path = "/v1/admin/owners/assign", request_body = Owner,
    responses((status = 204, description = "Assigned"), (status = 400, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 401, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 429, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 404, body = crate::api_v1::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn assign(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<Owner>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    let Ok(Json(owner)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Body must be {imei, customer}",
            None,
        );
    };
    let (imei, devices) = match device(&s, &owner.imei) {
        Ok(d) => d,
        Err(r) => return r,
    };
    if let Err(e) =
        s.v1.registry
            .assign(&imei, &owner.customer, &s.v1.keys)
            .await
    {
        return registry_error(e);
    }
    match audited(
        &s,
        "device.assign",
        &devices,
        &format!("to customer {}", owner.customer),
    )
    .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

#[utoipa::path(post, path = "/v1/admin/devices/state", request_body = crate::api_v1::DeviceState,
    responses((status = 200, description = "Set; every gateway's open connections follow within retention.owner_refresh_s (a blocked device's are closed)", body = crate::api_v1::DeviceState), (status = 400, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 401, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 429, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 503, body = crate::api_v1::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
/// Set any device's collection state, `blocked` included (audited).
async fn set_device_state(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<crate::api_v1::DeviceState>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    let Ok(Json(body)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Body must be {imei, state: active|paused|blocked}",
            None,
        );
    };
    let (imei, devices) = match device(&s, &body.imei) {
        Ok(d) => d,
        Err(r) => return r,
    };
    if let Err(r) = audited(&s, "device.state", &devices, body.state.as_str()).await {
        return r;
    }
    let pseudonyms = s.v1.keys.all_pseudonyms(&imei);
    let mut conn = s.v1.audit_conn.clone();
    if crate::collection::set(
        &mut conn,
        &pseudonyms,
        body.state,
        crate::collection::By::Operator,
    )
    .await
    .is_err()
    {
        return crate::api_v1::unavailable_response("Redis unreachable");
    }
    (StatusCode::OK, Json(body)).into_response()
}

#[utoipa::path(post, path = "/v1/admin/owners/unassign", request_body = Device,
    responses((status = 204, description = "Unassigned"), (status = 400, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 401, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 429, body = crate::api_v1::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn unassign(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<Device>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    let Ok(Json(body)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Body must be {imei}",
            None,
        );
    };
    let (imei, devices) = match device(&s, &body.imei) {
        Ok(d) => d,
        Err(r) => return r,
    };
    if let Err(e) = s.v1.registry.unassign(&imei, &s.v1.keys).await {
        return registry_error(e);
    }
    match audited(&s, "device.unassign", &devices, "").await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

/// `GET /v1/audit` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Newest entries to return (1..=1000, default 100).
    pub count: Option<u32>,
}

#[utoipa::path(get, path = "/v1/audit", params(AuditParams),
    responses((status = 200, description = "Newest first", body = Vec<Object>), (status = 400, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 401, body = crate::api_v1::Problem, content_type = "application/problem+json"), (status = 429, body = crate::api_v1::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
async fn audit_trail(
    State(s): State<AdminState>,
    headers: HeaderMap,
    q: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    let Ok(Query(q)) = q else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "count must be 1..=1000",
            None,
        );
    };
    let count = q.count.unwrap_or(100);
    if !(1..=1000).contains(&count) {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "count must be 1..=1000",
            None,
        );
    }
    let mut conn = s.v1.audit_conn.clone();
    let reply: Result<redis::streams::StreamRangeReply, _> = redis::cmd("XREVRANGE")
        .arg(AUDIT_KEY)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(count)
        .query_async(&mut conn)
        .await;
    let Ok(reply) = reply else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Redis unreachable; retry",
            None,
        );
    };
    let entries: Vec<serde_json::Value> = reply
        .ids
        .iter()
        .map(|e| {
            let mut m = serde_json::Map::new();
            m.insert("id".into(), e.id.clone().into());
            for (k, v) in &e.map {
                if let Ok(v) = redis::from_redis_value::<String>(v.clone()) {
                    m.insert(k.clone(), v.into());
                }
            }
            serde_json::Value::Object(m)
        })
        .collect();
    (StatusCode::OK, Json(entries)).into_response()
}
