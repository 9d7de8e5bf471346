//! API-level rejections: the 400/401 answers of the token endpoints, with the status, the
//! envelope `type`, the human message and the counter name of each.
//!
//! Plain data; usable from any thread.

use hyper::StatusCode;

/// Why a token request was refused. Each maps to one status, envelope type and counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Malformed request (400 `bad_request`); the text says what was wrong.
    BadRequest(String),
    InvalidSignature,
    UnknownKey,
    KeyRevoked,
    TimestampOutOfWindow,
    Replay,
    RefreshInvalid,
    RefreshExpired,
    RefreshReused,
    RefreshRevoked,
}

impl Reject {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The envelope's `type`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Reject::BadRequest(_) => "bad_request",
            _ => "unauthenticated",
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            Reject::BadRequest(m) => m.clone(),
            Reject::InvalidSignature => "invalid signature".into(),
            Reject::UnknownKey => "unknown key_id".into(),
            Reject::KeyRevoked => "key revoked".into(),
            Reject::TimestampOutOfWindow => "timestamp out of window".into(),
            Reject::Replay => "signature already used (replay)".into(),
            Reject::RefreshInvalid => "invalid refresh token".into(),
            Reject::RefreshExpired => "refresh token expired".into(),
            Reject::RefreshReused => {
                "refresh token already used; its token family is revoked".into()
            }
            Reject::RefreshRevoked => "refresh token revoked".into(),
        }
    }

    /// The name under which the counters record this rejection.
    pub(crate) fn counter(&self) -> &'static str {
        match self {
            Reject::BadRequest(_) => "bad_request",
            Reject::InvalidSignature => "invalid_signature",
            Reject::UnknownKey => "unknown_key",
            Reject::KeyRevoked => "key_revoked",
            Reject::TimestampOutOfWindow => "timestamp_out_of_window",
            Reject::Replay => "replay",
            Reject::RefreshInvalid => "refresh_invalid",
            Reject::RefreshExpired => "refresh_expired",
            Reject::RefreshReused => "refresh_reused",
            Reject::RefreshRevoked => "refresh_revoked",
        }
    }
}
