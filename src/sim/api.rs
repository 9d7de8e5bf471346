//! The three public endpoints of the Auth API: mint (`POST /v1/auth/api-key/token`),
//! refresh (`POST /v1/auth/token/refresh`) and the JWKS (`GET /.well-known/jwks.json`),
//! with fault injection applied before the real work (a lost answer: after it).
//!
//! Threading: runs in connection tasks. State is touched in short `lock` sections; the
//! request signature is verified between them, outside the lock; fault delays and hangs are
//! awaited with no lock held and end early on shutdown.

use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::StatusCode;
use serde_json::Value;

use super::error::SimError;
use super::fault::{Endpoint, FaultAction};
use super::http::{envelope, json_response, Ctx, Resp};
use super::reject::Reject;
use super::state::{lock, TokenResponse};
use super::verify;

pub(crate) async fn handle(
    ctx: &Ctx,
    endpoint: Endpoint,
    body: &Bytes,
    request_id: &str,
) -> Result<Resp, SimError> {
    let decision = {
        let mut st = lock(&ctx.state);
        st.counters.request(endpoint);
        let d = st.faults.decide(endpoint);
        for served in &d.served {
            st.counters.fault(served);
        }
        d
    };
    if !decision.latency.is_zero() && !ctx.sleep(decision.latency).await {
        return Err(SimError::InjectedDrop);
    }
    match decision.action {
        Some(FaultAction::Status {
            status,
            retry_after_secs,
        }) => return Ok(fault_response(status, retry_after_secs, request_id)),
        Some(FaultAction::Hang(d)) => {
            ctx.sleep(d).await;
            return Err(SimError::InjectedDrop);
        }
        Some(FaultAction::Reset) => return Err(SimError::InjectedDrop),
        Some(FaultAction::LoseAnswer) | None => {}
    }
    let outcome = match endpoint {
        Endpoint::Jwks => {
            let mut st = lock(&ctx.state);
            st.counters.jwks_fetches += 1;
            return Ok(json_response(StatusCode::OK, &st.jwks()));
        }
        Endpoint::Mint => mint(ctx, body),
        Endpoint::Refresh => refresh(ctx, body),
    };
    if decision.action == Some(FaultAction::LoseAnswer) {
        // The work is done (a refresh token spent, a pair issued); its answer never leaves.
        return Err(SimError::InjectedDrop);
    }
    Ok(match outcome {
        Ok(tokens) => {
            let mut resp = json_response(StatusCode::OK, &tokens);
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(reject) => {
            lock(&ctx.state).counters.reject(reject.counter());
            envelope(
                reject.status(),
                reject.kind(),
                &reject.message(),
                request_id,
            )
        }
    })
}

fn mint(ctx: &Ctx, body: &[u8]) -> Result<TokenResponse, Reject> {
    let req = verify::parse_mint(body)?;
    let key = lock(&ctx.state).precheck_mint(&req)?;
    if !verify::verify_challenge(&key, &req.key_id, req.timestamp, &req.signature) {
        return Err(Reject::InvalidSignature);
    }
    let mut st = lock(&ctx.state);
    let tokens = st.complete_mint(&req)?;
    st.counters.mints += 1;
    Ok(tokens)
}

fn refresh(ctx: &Ctx, body: &[u8]) -> Result<TokenResponse, Reject> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| Reject::BadRequest("request body is not valid JSON".into()))?;
    let token = match value.get("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(Reject::BadRequest("missing field `refresh_token`".into()))
        }
        Some(_) => {
            return Err(Reject::BadRequest(
                "`refresh_token` must be a string".into(),
            ))
        }
    };
    let mut st = lock(&ctx.state);
    let tokens = st.refresh(token)?;
    st.counters.refreshes += 1;
    Ok(tokens)
}

fn fault_response(status: u16, retry_after_secs: Option<u64>, request_id: &str) -> Resp {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, message) = match status {
        429 => ("rate_limited", "too many requests"),
        500 => ("internal", "internal server error"),
        502 => ("bad_gateway", "bad gateway"),
        503 => ("unavailable", "service unavailable"),
        504 => ("gateway_timeout", "gateway timeout"),
        _ => ("error", code.canonical_reason().unwrap_or("error")),
    };
    let mut resp = envelope(code, kind, message, request_id);
    if let Some(secs) = retry_after_secs {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}
