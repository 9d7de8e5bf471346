//! Wire errors: the stable codes and the error object (both defined, and re-exported from,
//! [`crate::protocol`]) and the one mapping from the agent's internal errors
//! ([`SignerError`], [`TokenError`], access refusals) to what a client is told. The internal
//! errors name their [`ErrorCode`] themselves (`wire_code()`); the messages are made here.
//!
//! The rule: the client gets the code and a short message that says what to do; the details
//! (PKCS#11 return values, HTTP bodies, paths) go to the agent's log only. Pure functions, no
//! state.

use std::borrow::Cow;

use crate::protocol::{excerpt, ECHO_MAX};
pub use crate::protocol::{ErrorCode, WireError};
use crate::signer::SignerError;
use crate::token::TokenError;

impl WireError {
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        WireError::new(ErrorCode::BadRequest, message)
    }

    /// A request line the JSON parser refused. Its message may quote the client's input
    /// (the name of an unknown field, a string of the wrong type) between backticks or
    /// double quotes, once: that quote is cut to [`ECHO_MAX`] characters and the whole
    /// escaped, then the position follows.
    pub fn invalid_json(err: &serde_json::Error) -> Self {
        let full = err.to_string();
        let position = if err.line() == 0 {
            String::new()
        } else {
            format!(" at line {} column {}", err.line(), err.column())
        };
        let what = full.strip_suffix(position.as_str()).unwrap_or(&full);
        let what = cut_quotes(what, ECHO_MAX);
        WireError::bad_request(format!(
            "invalid request: {}{position}",
            excerpt(&what, 400)
        ))
    }

    /// A request naming a protocol version other than 1. Such a line may carry fields that
    /// v1 does not know, so it is told about the version rather than about those fields.
    pub fn unsupported_version(v: u64) -> Self {
        WireError::new(
            ErrorCode::UnsupportedVersion,
            crate::protocol::unsupported_version_message(v),
        )
    }

    /// The peer's access rules do not allow `op` on `profile`.
    pub fn forbidden(op: &str, profile: Option<&str>) -> Self {
        let what = match profile {
            Some(p) => format!("`{op}` on profile `{}`", excerpt(p, ECHO_MAX)),
            None => format!("`{op}`"),
        };
        WireError::new(
            ErrorCode::Forbidden,
            format!(
                "permission denied by the agent: your user may not use {what}; ask for it to be \
                 added to an [[access]] rule of tm-agent's config"
            ),
        )
    }

    pub fn unknown_profile(profile: &str) -> Self {
        WireError::new(
            ErrorCode::UnknownProfile,
            format!(
                "no profile `{}` in this agent (see `tm-agent status`)",
                excerpt(profile, ECHO_MAX)
            ),
        )
    }

    pub fn internal() -> Self {
        WireError::new(
            ErrorCode::Internal,
            "internal error in the agent; see its log (journalctl -u tm-agent)",
        )
    }

    /// The code and message for a signing failure. The full error belongs in the log.
    pub fn from_signer(err: &SignerError) -> Self {
        let code = err.wire_code();
        let message = match code {
            ErrorCode::Busy => "the signer is busy: retry shortly",
            ErrorCode::Timeout => {
                "the signer did not answer in time: retry; if it persists, check the HSM or card"
            }
            ErrorCode::Unavailable => {
                "the signer is unavailable: see `tm-agent status` and the agent's log"
            }
            _ => "signing failed: see the agent's log (journalctl -u tm-agent)",
        };
        WireError::new(code, message)
    }

    /// The code and message for a token that cannot be handed out.
    pub fn from_token(err: &TokenError, profile: &str) -> Self {
        let code = err.wire_code();
        let message = match err {
            TokenError::Timeout(_) => format!(
                "renewing the access token of profile `{profile}` did not finish in time: retry shortly"
            ),
            TokenError::ShortOfMinTtl {
                expires_in,
                retry_in,
                ..
            } => format!(
                "the access token of profile `{profile}` expires in {} s, short of the min_ttl \
                 asked for, and the agent cannot renew it right now{}: ask with a smaller \
                 min_ttl, or see `tm-agent status` and the agent's log",
                expires_in.as_secs(),
                retry_in
                    .map(|d| format!(" (next attempt in {} s)", d.as_secs_f64().ceil()))
                    .unwrap_or_default()
            ),
            TokenError::RenewalFailing { retry_in, .. } => format!(
                "no valid access token for profile `{profile}` right now: renewing it is failing{}; \
                 see `tm-agent status` and the agent's log",
                retry_in
                    .map(|d| format!(" (next attempt in {} s)", d.as_secs_f64().ceil()))
                    .unwrap_or_default()
            ),
            TokenError::Unavailable(_) => format!(
                "no valid access token for profile `{profile}` right now: see `tm-agent status` \
                 and the agent's log"
            ),
        };
        WireError::new(code, message)
    }
}

/// `text`, a serde error message, with the client's input that it quotes cut to `max`
/// characters (`…` marks a cut). serde quotes that input first, between backticks or double
/// quotes (``unknown field `X`, expected one of …``, `invalid type: string "X", expected …`),
/// and the input may itself hold quote marks: so the quoted run is taken to reach the last
/// `<quote>, expected` (else the last quote mark), not the next quote mark.
fn cut_quotes(text: &str, max: usize) -> Cow<'_, str> {
    let Some(start) = text.find(['`', '"']) else {
        return Cow::Borrowed(text);
    };
    let quote = &text[start..=start];
    let inner = start + 1;
    let rest = &text[inner..];
    let end = rest
        .rfind(&format!("{quote}, expected"))
        .or_else(|| rest.rfind(quote))
        .map_or(text.len(), |i| inner + i);
    let echoed = &text[inner..end];
    if echoed.chars().count() <= max {
        return Cow::Borrowed(text);
    }
    let kept: String = echoed.chars().take(max).collect();
    Cow::Owned(format!("{}{kept}…{}", &text[..inner], &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn signer_errors_map_to_stable_codes_without_details() {
        let e = WireError::from_signer(&SignerError::Busy { depth: 7 });
        assert_eq!(e.code, ErrorCode::Busy);
        let e = WireError::from_signer(&SignerError::Pkcs11 {
            func: "C_Sign",
            rv: "CKR_DEVICE_ERROR".into(),
            hint: "",
        });
        assert_eq!(e.code, ErrorCode::SignerError);
        assert!(!e.message.contains("CKR_"), "details stay in the log");
        let e = WireError::from_signer(&SignerError::Timeout(Duration::from_secs(1)));
        assert_eq!(e.code, ErrorCode::Timeout);
        let e = WireError::from_signer(&SignerError::Closed);
        assert_eq!(e.code, ErrorCode::Unavailable);
    }

    #[test]
    fn client_text_is_echoed_escaped_and_bounded() {
        let forged = format!("x\n<0>audit: FORGED{}", "z".repeat(60_000));
        let line = format!(
            r#"{{"v":1,"id":1,"op":"ping","{}":1}}"#,
            forged.replace('\n', "\\n")
        );
        let err = serde_json::from_str::<crate::protocol::RawRequest>(&line).unwrap_err();
        let e = WireError::invalid_json(&err);
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(
            e.message.len() < 300 && !e.message.contains('\n'),
            "{}",
            e.message
        );
        assert!(e
            .message
            .starts_with("invalid request: unknown field `x\\n<0>audit: FORGED"));
        // At most ECHO_MAX characters of the client's field name (the \n escaped as 2).
        let echoed = e.message.split('`').nth(1).unwrap();
        assert_eq!(echoed.chars().count(), ECHO_MAX + 2, "{echoed}");
        assert!(echoed.ends_with("zz…"), "{echoed}");
        assert!(e
            .message
            .ends_with(&format!(" at line 1 column {}", err.column())));
        // Quote marks inside the client's text do not end the quoted run early.
        for line in [
            format!(r#"{{"v":1,"id":1,"op":"ping","a`{}":1}}"#, "B".repeat(300)),
            format!(r#"{{"v":"a\"{}","id":7,"op":"ping"}}"#, "G".repeat(300)),
            format!(
                r#"{{"v":1,"id":1,"op":"ping","a`, expected `{}":1}}"#,
                "C".repeat(300)
            ),
        ] {
            let err = serde_json::from_str::<crate::protocol::RawRequest>(&line).unwrap_err();
            let e = WireError::invalid_json(&err);
            for run in ["BBBB", "GGGG", "CCCC"] {
                let echoed = e.message.matches(run).count() * run.len();
                assert!(echoed <= ECHO_MAX, "{echoed} echoed: {}", e.message);
            }
            assert!(e.message.contains('…'), "{}", e.message);
            assert!(e.message.len() < 300, "{}", e.message);
        }
        for e in [
            WireError::forbidden("token", Some(&forged)),
            WireError::unknown_profile(&forged),
        ] {
            assert!(
                e.message.len() < 400 && !e.message.contains('\n'),
                "{}",
                e.message
            );
        }
        let e = WireError::invalid_json(&serde_json::from_str::<u8>("").unwrap_err());
        assert!(
            e.message.starts_with("invalid request: EOF"),
            "{}",
            e.message
        );
    }

    #[test]
    fn token_errors_map_to_stable_codes() {
        let e = WireError::from_token(&TokenError::Unavailable("500 from API".into()), "prod");
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(!e.message.contains("500"));
        let e = WireError::from_token(&TokenError::Timeout(Duration::from_secs(1)), "prod");
        assert_eq!(e.code, ErrorCode::Timeout);
        let short = TokenError::ShortOfMinTtl {
            expires_in: Duration::from_secs(430),
            retry_in: Some(Duration::from_millis(11_200)),
            reason: "token renewal failed (http_503: upstream)".into(),
        };
        let e = WireError::from_token(&short, "prod");
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(
            e.message.contains("expires in 430 s, short of the min_ttl")
                && e.message.contains("next attempt in 12 s"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("503"), "{}", e.message);
        let failing = TokenError::RenewalFailing {
            retry_in: Some(Duration::from_millis(4_100)),
            reason: "token renewal failed (server_error: 503 upstream)".into(),
        };
        let e = WireError::from_token(&failing, "prod");
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(
            e.message
                .contains("renewing it is failing (next attempt in 5 s)"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("503"), "{}", e.message);
    }
}
