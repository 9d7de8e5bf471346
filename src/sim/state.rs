//! The simulator's whole mutable state in one place: settings, the key registry, the issuer
//! keys, refresh-token families, active faults, the replay cache and the counters.
//!
//! Threading: one `SimState` behind `Arc<std::sync::Mutex<_>>` (`Shared`). Every method is
//! synchronous and short; callers take the lock, call, and drop the guard before any
//! `.await` (the guard is `!Send`, so the compiler enforces it in handlers). Signature
//! verification of requests runs outside the lock (see `api`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use p256::ecdsa::VerifyingKey;
use serde::Serialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::counters::Counters;
use super::error::SimError;
use super::fault::FaultTable;
use super::keys::{random_uuid, KeyRegistration, RegisteredKey, RegisteredKeyInfo};
use super::reject::Reject;
use super::tokens::{verify_jwt, IssuerKey, KeySet};
use super::verify::MintRequest;
use super::SimConfig;

/// The state shared by the listeners, the admin API and `SimHandle`.
pub(crate) type Shared = Arc<Mutex<SimState>>;

/// Takes the state lock. A panic while holding it cannot leave the state half-updated in a
/// way that matters to a simulator, so poisoning is ignored.
pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, SimState> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ten years: the bound for TTLs and clock offsets, so time arithmetic cannot overflow.
const MAX_SECS: u64 = 10 * 365 * 24 * 3600;

/// The body of a successful mint or refresh.
#[derive(Clone, Serialize)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    pub refresh_token: String,
    /// RFC 3339 time of the access token's expiry.
    pub expires_in: String,
    pub token_type: &'static str,
}

/// Result of a JWKS rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RotateInfo {
    /// The new signing key's `kid`.
    pub kid: String,
    /// The previous key's `kid`, published until the grace period ends.
    pub previous_kid: String,
    pub grace_secs: u64,
}

struct RefreshRecord {
    family: u64,
    key_id: String,
    exp: i64,
    spent: bool,
}

#[derive(Default)]
struct RefreshStore {
    records: HashMap<String, RefreshRecord>,
    revoked_families: HashSet<u64>,
    next_family: u64,
}

pub(crate) struct SimState {
    issuer: String,
    access_ttl: Duration,
    refresh_ttl: Duration,
    jwks_grace: Duration,
    clock_offset: i64,
    window: i64,
    reject_replay: bool,
    keys: HashMap<String, RegisteredKey>,
    keyset: KeySet,
    refresh_key: IssuerKey,
    foreign_key: IssuerKey,
    foreign_remaining: u32,
    foreign_same_kid: bool,
    refresh: RefreshStore,
    /// (key_id, timestamp, signature) → sim time after which the entry can go.
    replay_seen: HashMap<(String, i64, [u8; 64]), i64>,
    pub(crate) faults: FaultTable,
    pub(crate) counters: Counters,
}

fn check_secs(what: &str, d: Duration) -> Result<Duration, SimError> {
    if d.is_zero() || d.as_secs() > MAX_SECS {
        return Err(SimError::Setting(format!(
            "{what} must be between 1 s and 10 years, got {d:?}"
        )));
    }
    Ok(d)
}

fn check_offset(secs: i64) -> Result<i64, SimError> {
    if secs.unsigned_abs() > MAX_SECS {
        return Err(SimError::Setting(format!(
            "clock offset {secs} s is beyond ±10 years"
        )));
    }
    Ok(secs)
}

impl SimState {
    pub(crate) fn new(config: &SimConfig) -> Result<Self, SimError> {
        if config.jwks_grace.as_secs() > MAX_SECS {
            return Err(SimError::Setting("jwks grace beyond 10 years".into()));
        }
        if config.timestamp_window_secs > MAX_SECS {
            return Err(SimError::Setting("timestamp window beyond 10 years".into()));
        }
        let mut st = SimState {
            issuer: config.issuer.clone(),
            access_ttl: check_secs("access TTL", config.access_ttl)?,
            refresh_ttl: check_secs("refresh TTL", config.refresh_ttl)?,
            jwks_grace: config.jwks_grace,
            clock_offset: check_offset(config.clock_offset_secs)?,
            window: config.timestamp_window_secs as i64,
            reject_replay: config.reject_replay,
            keys: HashMap::new(),
            keyset: KeySet::new(),
            refresh_key: IssuerKey::generate(),
            foreign_key: IssuerKey::generate(),
            foreign_remaining: 0,
            foreign_same_kid: false,
            refresh: RefreshStore::default(),
            replay_seen: HashMap::new(),
            faults: FaultTable::default(),
            counters: Counters::default(),
        };
        for reg in &config.keys {
            st.register(reg.clone())?;
        }
        Ok(st)
    }

    // ---- clock ----

    /// The simulator's clock (wall clock plus offset), as Unix seconds.
    pub(crate) fn now_unix(&self) -> i64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        wall + self.clock_offset
    }

    /// The simulator's clock as a `SystemTime` (for the `Date` header).
    pub(crate) fn now_system(&self) -> SystemTime {
        let now = SystemTime::now();
        let off = Duration::from_secs(self.clock_offset.unsigned_abs());
        let shifted = if self.clock_offset >= 0 {
            now.checked_add(off)
        } else {
            now.checked_sub(off)
        };
        shifted.unwrap_or(now)
    }

    pub(crate) fn clock_offset(&self) -> i64 {
        self.clock_offset
    }

    pub(crate) fn set_clock_offset(&mut self, secs: i64) -> Result<(), SimError> {
        self.clock_offset = check_offset(secs)?;
        Ok(())
    }

    // ---- settings ----

    pub(crate) fn set_access_ttl(&mut self, d: Duration) -> Result<(), SimError> {
        self.access_ttl = check_secs("access TTL", d)?;
        Ok(())
    }

    pub(crate) fn set_refresh_ttl(&mut self, d: Duration) -> Result<(), SimError> {
        self.refresh_ttl = check_secs("refresh TTL", d)?;
        Ok(())
    }

    pub(crate) fn set_reject_replay(&mut self, on: bool) {
        self.reject_replay = on;
        if !on {
            self.replay_seen.clear();
        }
    }

    pub(crate) fn set_foreign(&mut self, count: u32, same_kid: bool) {
        self.foreign_remaining = count;
        self.foreign_same_kid = same_kid;
    }

    // ---- keys ----

    pub(crate) fn register(&mut self, reg: KeyRegistration) -> Result<RegisteredKeyInfo, SimError> {
        let key = RegisteredKey::from_registration(reg)?;
        let info = key.info.clone();
        self.keys.insert(info.key_id.clone(), key);
        Ok(info)
    }

    pub(crate) fn revoke_key(&mut self, key_id: &str) -> Result<RegisteredKeyInfo, SimError> {
        let key = self
            .keys
            .get_mut(&key_id.to_ascii_lowercase())
            .ok_or_else(|| SimError::Registration(format!("key_id {key_id} is not registered")))?;
        key.info.revoked = true;
        Ok(key.info.clone())
    }

    pub(crate) fn keys(&self) -> Vec<RegisteredKeyInfo> {
        let mut v: Vec<_> = self.keys.values().map(|k| k.info.clone()).collect();
        v.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        v
    }

    // ---- mint ----

    /// First half of a mint, under the lock: the key must be known and live and the
    /// timestamp within the window. Returns the key to verify with (outside the lock).
    pub(crate) fn precheck_mint(&self, req: &MintRequest) -> Result<VerifyingKey, Reject> {
        let key = self
            .keys
            .get(&req.key_id.to_ascii_lowercase())
            .ok_or(Reject::UnknownKey)?;
        if key.info.revoked {
            return Err(Reject::KeyRevoked);
        }
        if req.timestamp.abs_diff(self.now_unix()) > self.window as u64 {
            return Err(Reject::TimestampOutOfWindow);
        }
        Ok(key.public_key)
    }

    /// Second half, after the signature verified: replay check, then a new token family.
    pub(crate) fn complete_mint(&mut self, req: &MintRequest) -> Result<TokenResponse, Reject> {
        let now = self.now_unix();
        if self.reject_replay {
            self.replay_seen.retain(|_, until| *until >= now);
            let entry = (
                req.key_id.to_ascii_lowercase(),
                req.timestamp,
                req.signature,
            );
            if self.replay_seen.contains_key(&entry) {
                return Err(Reject::Replay);
            }
            self.replay_seen.insert(entry, req.timestamp + self.window);
        }
        self.refresh.next_family += 1;
        let family = self.refresh.next_family;
        self.issue(&req.key_id.to_ascii_lowercase(), family)
    }

    // ---- refresh ----

    pub(crate) fn refresh(&mut self, token: &str) -> Result<TokenResponse, Reject> {
        let (_, claims) =
            verify_jwt(&self.refresh_key.verifying_key(), token).ok_or(Reject::RefreshInvalid)?;
        if claims.get("token_use").and_then(Value::as_str) != Some("refresh") {
            return Err(Reject::RefreshInvalid);
        }
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .ok_or(Reject::RefreshInvalid)?;
        let now = self.now_unix();
        let rec = self
            .refresh
            .records
            .get_mut(jti)
            .ok_or(Reject::RefreshInvalid)?;
        let family = rec.family;
        if self.refresh.revoked_families.contains(&family) {
            return Err(Reject::RefreshRevoked);
        }
        if rec.spent {
            self.refresh.revoked_families.insert(family);
            return Err(Reject::RefreshReused);
        }
        if now >= rec.exp {
            return Err(Reject::RefreshExpired);
        }
        match self.keys.get(&rec.key_id) {
            Some(k) if !k.info.revoked => {}
            _ => return Err(Reject::KeyRevoked),
        }
        rec.spent = true;
        let key_id = rec.key_id.clone();
        self.issue(&key_id, family)
    }

    /// Revokes every refresh-token family issued so far. Returns how many.
    pub(crate) fn revoke_all_refresh(&mut self) -> usize {
        let families: HashSet<u64> = self.refresh.records.values().map(|r| r.family).collect();
        let n = families.len();
        self.refresh.revoked_families.extend(families);
        n
    }

    // ---- issuance ----

    fn issue(&mut self, key_id: &str, family: u64) -> Result<TokenResponse, Reject> {
        let info = self
            .keys
            .get(key_id)
            .map(|k| k.info.clone())
            .ok_or(Reject::UnknownKey)?;
        let now = self.now_unix();
        let access_exp = now + self.access_ttl.as_secs() as i64;
        let refresh_exp = now + self.refresh_ttl.as_secs() as i64;

        let mut claims = json!({
            "iss": self.issuer, "sub": info.sub, "uid": info.uid,
            "iat": now, "exp": access_exp, "jti": random_uuid(),
        });
        if let Some(org) = &info.org_id {
            // Public sources name the claim `tm.organization_id` without settling whether
            // it is nested or a dotted name: emit both so either reading works.
            claims["tm"] = json!({ "organization_id": org });
            claims["tm.organization_id"] = json!(org);
        }
        let access_token = if self.foreign_remaining > 0 {
            self.foreign_remaining -= 1;
            self.counters.foreign_tokens += 1;
            let kid = if self.foreign_same_kid {
                self.keyset.current().kid.clone()
            } else {
                self.foreign_key.kid.clone()
            };
            self.foreign_key.sign_jwt(&kid, &claims)
        } else {
            let key = self.keyset.current();
            key.sign_jwt(&key.kid, &claims)
        };

        let refresh_jti = random_uuid();
        let refresh_claims = json!({
            "iss": self.issuer, "sub": info.sub, "uid": info.uid,
            "iat": now, "exp": refresh_exp, "jti": refresh_jti, "token_use": "refresh",
        });
        let refresh_token = self
            .refresh_key
            .sign_jwt(&self.refresh_key.kid, &refresh_claims);
        if self.refresh.records.len() > 10_000 {
            // Keep memory bounded in long load runs; long-expired records only matter for
            // telling "expired" from "invalid".
            self.refresh.records.retain(|_, r| r.exp > now - 3600);
        }
        self.refresh.records.insert(
            refresh_jti,
            RefreshRecord {
                family,
                key_id: key_id.to_string(),
                exp: refresh_exp,
                spent: false,
            },
        );
        let expires_in = OffsetDateTime::from_unix_timestamp(access_exp)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default();
        Ok(TokenResponse {
            access_token,
            refresh_token,
            expires_in,
            token_type: "Bearer",
        })
    }

    // ---- JWKS ----

    pub(crate) fn jwks(&mut self) -> Value {
        json!({ "keys": self.keyset.published(Instant::now()) })
    }

    pub(crate) fn current_kid(&self) -> String {
        self.keyset.current().kid.clone()
    }

    pub(crate) fn rotate_jwks(&mut self, grace: Option<Duration>) -> Result<RotateInfo, SimError> {
        let grace = grace.unwrap_or(self.jwks_grace);
        if grace.as_secs() > MAX_SECS {
            return Err(SimError::Setting("grace beyond 10 years".into()));
        }
        let (kid, previous_kid) = self.keyset.rotate(grace, Instant::now());
        Ok(RotateInfo {
            kid,
            previous_kid,
            grace_secs: grace.as_secs(),
        })
    }

    // ---- introspection ----

    pub(crate) fn snapshot(&self) -> Value {
        json!({
            "issuer": self.issuer,
            "access_ttl_secs": self.access_ttl.as_secs(),
            "refresh_ttl_secs": self.refresh_ttl.as_secs(),
            "jwks_grace_secs": self.jwks_grace.as_secs(),
            "clock_offset_secs": self.clock_offset,
            "now": self.now_unix(),
            "timestamp_window_secs": self.window,
            "reject_replay": self.reject_replay,
            "current_kid": self.keyset.current().kid,
            "foreign_remaining": self.foreign_remaining,
            "keys": self.keys(),
            "faults": self.faults.list(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;

    const KID: &str = "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70";

    fn state() -> SimState {
        let vk = *SigningKey::from_slice(&[4u8; 32]).unwrap().verifying_key();
        let config = SimConfig {
            keys: vec![KeyRegistration::new(KID, vk).with_org("org-1")],
            ..SimConfig::default()
        };
        SimState::new(&config).unwrap()
    }

    fn mint(st: &mut SimState) -> TokenResponse {
        let req = MintRequest {
            key_id: KID.into(),
            timestamp: st.now_unix(),
            signature: [0; 64],
        };
        st.precheck_mint(&req).unwrap();
        st.complete_mint(&req).unwrap()
    }

    #[test]
    fn refresh_rotation_and_reuse_revokes_family() {
        let mut st = state();
        let first = mint(&mut st);
        let second = st.refresh(&first.refresh_token).unwrap();
        let third = st.refresh(&second.refresh_token).unwrap();
        assert_eq!(
            st.refresh(&first.refresh_token).err(),
            Some(Reject::RefreshReused)
        );
        assert_eq!(
            st.refresh(&third.refresh_token).err(),
            Some(Reject::RefreshRevoked)
        );
        // Another family is unaffected.
        let other = mint(&mut st);
        assert!(st.refresh(&other.refresh_token).is_ok());
        assert_eq!(st.refresh("a.b.c").err(), Some(Reject::RefreshInvalid));
        assert_eq!(
            st.refresh(&other.access_token).err(),
            Some(Reject::RefreshInvalid)
        );
    }

    #[test]
    fn expiry_follows_the_offset_clock() {
        let mut st = state();
        st.set_refresh_ttl(Duration::from_secs(5)).unwrap();
        let t = mint(&mut st);
        st.set_clock_offset(10).unwrap();
        assert_eq!(
            st.refresh(&t.refresh_token).err(),
            Some(Reject::RefreshExpired)
        );
    }

    #[test]
    fn org_claims_and_expiry_format() {
        let mut st = state();
        let t = mint(&mut st);
        let (_, claims) =
            verify_jwt(&st.keyset.current().verifying_key(), &t.access_token).unwrap();
        assert_eq!(claims["tm"]["organization_id"], "org-1");
        assert_eq!(claims["tm.organization_id"], "org-1");
        let exp = claims["exp"].as_i64().unwrap();
        let parsed = OffsetDateTime::parse(&t.expires_in, &Rfc3339).unwrap();
        assert_eq!(parsed.unix_timestamp(), exp);
        assert!(t.expires_in.ends_with('Z'));
    }

    #[test]
    fn window_and_revocation() {
        let mut st = state();
        let now = st.now_unix();
        let mut req = MintRequest {
            key_id: KID.into(),
            timestamp: now - 31,
            signature: [0; 64],
        };
        assert_eq!(
            st.precheck_mint(&req).err(),
            Some(Reject::TimestampOutOfWindow)
        );
        req.timestamp = now + 29;
        assert!(st.precheck_mint(&req).is_ok());
        st.set_reject_replay(true);
        assert!(st.complete_mint(&req).is_ok());
        assert_eq!(st.complete_mint(&req).err(), Some(Reject::Replay));
        st.revoke_key(KID).unwrap();
        assert_eq!(st.precheck_mint(&req).err(), Some(Reject::KeyRevoked));
        req.key_id = "11111111-2222-4333-8444-555555555555".into();
        assert_eq!(st.precheck_mint(&req).err(), Some(Reject::UnknownKey));
    }
}
