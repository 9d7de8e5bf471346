//! Access tokens per profile: mint, scheduled refresh, backoff, single-flight renewal, JWKS
//! verification. (API skeleton: the implementation lands with issue #3.)
//!
//! Owns: one background task per profile that holds the refresh token (never handed out)
//! and publishes the current access token on a `watch` channel, so `token` requests are
//! answered from memory.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// An access token as handed to clients. `Debug` never shows the token.
#[derive(Clone)]
pub struct AccessToken {
    /// The JWT, sent as `Authorization: Bearer <token>`.
    pub token: Arc<str>,
    /// The earlier of `expires_in` and the JWT `exp`, on the local clock.
    pub expires_at: SystemTime,
    /// When the agent received it (local clock).
    pub received_at: SystemTime,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why no token could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no valid access token: {0}")]
    Unavailable(String),
    #[error("token renewal did not finish within {0:?}")]
    Timeout(Duration),
}

impl TokenError {
    /// The stable wire error code.
    pub fn wire_code(&self) -> &'static str {
        match self {
            TokenError::Unavailable(_) => "unavailable",
            TokenError::Timeout(_) => "timeout",
        }
    }
}

/// State of a profile's token machinery, for `status`.
#[derive(Debug, Clone, Default)]
pub struct TokenStatus {
    pub expires_at: Option<SystemTime>,
    pub last_mint: Option<SystemTime>,
    pub last_refresh: Option<SystemTime>,
    pub next_refresh: Option<SystemTime>,
    pub consecutive_failures: u32,
    /// A stable code such as `unauthorized`, `server_error`, `transport`.
    pub last_error_code: Option<String>,
    /// A human-readable, secret-free message.
    pub last_error: Option<String>,
    /// Server clock minus local clock, learned from `Date`.
    pub clock_offset_secs: i64,
}

/// The handle of one profile's token manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    current: watch::Receiver<Option<Arc<AccessToken>>>,
}

impl Manager {
    /// The current token if it is valid for at least `min_ttl` (default: valid at all);
    /// otherwise waits for one shared renewal.
    pub async fn token(&self, _min_ttl: Option<Duration>) -> Result<Arc<AccessToken>, TokenError> {
        Err(TokenError::Unavailable("not implemented yet".into()))
    }

    /// Receives each new token (rotation) as it arrives.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<AccessToken>>> {
        self.current.clone()
    }

    /// A status snapshot.
    pub fn status(&self) -> TokenStatus {
        TokenStatus::default()
    }

    /// The server's clock as learned from `Date` headers (local clock + offset).
    pub fn server_now(&self) -> SystemTime {
        SystemTime::now()
    }
}
