//! Fault injection: what can go wrong (a status, a hang, a reset, added latency), where
//! (mint, refresh, JWKS or all three), and when (the next N requests, or at a rate).
//!
//! `FaultTable` is plain data owned by `state::SimState` and consulted under its lock once
//! per API request; the chosen action is then carried out by the HTTP layer outside the lock.

use std::time::Duration;

use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::SimError;

/// The API endpoints a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v1/auth/api-key/token`
    Mint,
    /// `POST /v1/auth/token/refresh`
    Refresh,
    /// `GET /.well-known/jwks.json`
    Jwks,
}

/// Which endpoints a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    Mint,
    Refresh,
    Jwks,
    #[default]
    All,
}

impl FaultTarget {
    fn matches(self, e: Endpoint) -> bool {
        matches!(
            (self, e),
            (FaultTarget::All, _)
                | (FaultTarget::Mint, Endpoint::Mint)
                | (FaultTarget::Refresh, Endpoint::Refresh)
                | (FaultTarget::Jwks, Endpoint::Jwks)
        )
    }
}

/// What the fault does.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// Answer with this status and the error envelope (429 always carries `Retry-After`).
    Status {
        status: u16,
        retry_after_secs: Option<u64>,
    },
    /// Hold the connection without answering, then drop it.
    Hang(Duration),
    /// Drop the connection without an answer (TCP RST).
    Reset,
    /// Do the work (a mint or refresh takes effect: a refresh token is spent), then drop the
    /// connection without the answer: an answer lost on the way back.
    LoseAnswer,
    /// Delay the (otherwise normal) answer.
    Latency(Duration),
}

/// When the fault fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultTrigger {
    /// The next N matching requests.
    Count(u32),
    /// Each matching request with this probability (0..=1), until cleared.
    Rate(f64),
}

/// A fault to inject.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    pub kind: FaultKind,
    pub target: FaultTarget,
    pub trigger: FaultTrigger,
}

impl FaultSpec {
    /// `status` on the next `count` requests to `target`.
    pub fn status(status: u16, target: FaultTarget, count: u32) -> Self {
        let retry_after_secs = (status == 429).then_some(1);
        FaultSpec {
            kind: FaultKind::Status {
                status,
                retry_after_secs,
            },
            target,
            trigger: FaultTrigger::Count(count),
        }
    }

    /// `kind` on the next `count` requests to `target`.
    pub fn next(kind: FaultKind, target: FaultTarget, count: u32) -> Self {
        FaultSpec {
            kind,
            target,
            trigger: FaultTrigger::Count(count),
        }
    }

    /// `kind` on each request to `target` with probability `rate`.
    pub fn rate(kind: FaultKind, target: FaultTarget, rate: f64) -> Self {
        FaultSpec {
            kind,
            target,
            trigger: FaultTrigger::Rate(rate),
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        if let FaultKind::Status { status, .. } = self.kind {
            if !(400..=599).contains(&status) {
                return Err(SimError::Fault(format!(
                    "status {status} is not an error status (400..=599)"
                )));
            }
        }
        match self.trigger {
            FaultTrigger::Rate(r) if !(0.0..=1.0).contains(&r) => {
                Err(SimError::Fault(format!("rate {r} is not within 0..=1")))
            }
            FaultTrigger::Count(0) => Err(SimError::Fault("count must be at least 1".into())),
            _ => Ok(()),
        }
    }

    /// The admin API's JSON form (see [`FaultSpec::from_json`]).
    pub fn to_json(&self) -> Value {
        let mut v = match &self.kind {
            FaultKind::Status {
                status,
                retry_after_secs,
            } => json!({"kind": "status", "status": status, "retry_after_secs": retry_after_secs}),
            FaultKind::Hang(d) => json!({"kind": "hang", "ms": d.as_millis() as u64}),
            FaultKind::Reset => json!({"kind": "reset"}),
            FaultKind::LoseAnswer => json!({"kind": "lose_answer"}),
            FaultKind::Latency(d) => json!({"kind": "latency", "ms": d.as_millis() as u64}),
        };
        v["target"] = json!(self.target);
        match self.trigger {
            FaultTrigger::Count(n) => v["count"] = json!(n),
            FaultTrigger::Rate(r) => v["rate"] = json!(r),
        }
        v
    }

    /// Parses the admin JSON: `{"kind": "status"|"hang"|"reset"|"lose_answer"|"latency", "target":
    /// "mint"|"refresh"|"jwks"|"all" (default all), "count": N | "rate": 0..1 (default count
    /// 1)}` plus `status` and optional `retry_after_secs` for status, `secs` or `ms` for hang
    /// and latency.
    pub fn from_json(v: &Value) -> Result<Self, SimError> {
        let req: FaultJson = serde_json::from_value(v.clone())
            .map_err(|e| SimError::Fault(format!("bad fault JSON: {e}")))?;
        let duration = || -> Result<Duration, SimError> {
            match (req.secs, req.ms) {
                // try_: a negative, non-finite or huge `secs` is a 400, not a panic.
                (Some(s), None) => Duration::try_from_secs_f64(s).map_err(|_| {
                    SimError::Fault(format!(
                        "{} `secs` {s:?} is not a duration in seconds (>= 0, finite, in range)",
                        req.kind
                    ))
                }),
                (None, Some(ms)) => Ok(Duration::from_millis(ms)),
                _ => Err(SimError::Fault(format!(
                    "{} needs exactly one of `secs` (>= 0) or `ms`",
                    req.kind
                ))),
            }
        };
        let kind = match req.kind.as_str() {
            "status" => {
                let status = req
                    .status
                    .ok_or_else(|| SimError::Fault("kind status needs `status`".into()))?;
                let retry_after_secs = req.retry_after_secs.or((status == 429).then_some(1));
                FaultKind::Status {
                    status,
                    retry_after_secs,
                }
            }
            "hang" => FaultKind::Hang(duration()?),
            "latency" => FaultKind::Latency(duration()?),
            "reset" => FaultKind::Reset,
            "lose_answer" => FaultKind::LoseAnswer,
            other => {
                return Err(SimError::Fault(format!(
                    "unknown kind {other:?} (status, hang, reset, lose_answer, latency)"
                )))
            }
        };
        let trigger = match (req.count, req.rate) {
            (Some(_), Some(_)) => {
                return Err(SimError::Fault("give `count` or `rate`, not both".into()))
            }
            (None, Some(r)) => FaultTrigger::Rate(r),
            (Some(n), None) => FaultTrigger::Count(n),
            (None, None) => FaultTrigger::Count(1),
        };
        let spec = FaultSpec {
            kind,
            target: req.target.unwrap_or_default(),
            trigger,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The counter name of a served fault.
    fn counter(&self) -> String {
        match &self.kind {
            FaultKind::Status { status, .. } => format!("status_{status}"),
            FaultKind::Hang(_) => "hang".into(),
            FaultKind::Reset => "reset".into(),
            FaultKind::LoseAnswer => "lose_answer".into(),
            FaultKind::Latency(_) => "latency".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultJson {
    kind: String,
    #[serde(default)]
    target: Option<FaultTarget>,
    #[serde(default)]
    count: Option<u32>,
    #[serde(default)]
    rate: Option<f64>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    retry_after_secs: Option<u64>,
    #[serde(default)]
    secs: Option<f64>,
    #[serde(default)]
    ms: Option<u64>,
}

/// The terminal action for one request (latency is separate: it delays, then this runs).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FaultAction {
    Status {
        status: u16,
        retry_after_secs: Option<u64>,
    },
    Hang(Duration),
    Reset,
    LoseAnswer,
}

/// What to do with one request.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct FaultDecision {
    pub latency: Duration,
    pub action: Option<FaultAction>,
    /// Counter names of the faults served, for `Counters::faults_served`.
    pub served: Vec<String>,
}

struct ActiveFault {
    id: u64,
    spec: FaultSpec,
    /// For `Count`: how many are left.
    remaining: u32,
}

/// The active faults, in the order they were injected.
#[derive(Default)]
pub(crate) struct FaultTable {
    active: Vec<ActiveFault>,
    next_id: u64,
}

impl FaultTable {
    pub(crate) fn add(&mut self, spec: FaultSpec) -> Result<u64, SimError> {
        spec.validate()?;
        self.next_id += 1;
        let remaining = match spec.trigger {
            FaultTrigger::Count(n) => n,
            FaultTrigger::Rate(_) => 0,
        };
        self.active.push(ActiveFault {
            id: self.next_id,
            spec,
            remaining,
        });
        Ok(self.next_id)
    }

    pub(crate) fn clear(&mut self) {
        self.active.clear();
    }

    pub(crate) fn list(&self) -> Vec<Value> {
        self.active
            .iter()
            .map(|f| {
                let mut v = f.spec.to_json();
                v["id"] = json!(f.id);
                if let FaultTrigger::Count(_) = f.spec.trigger {
                    v["remaining"] = json!(f.remaining);
                }
                v
            })
            .collect()
    }

    /// Decides the faults for one request to `endpoint`. Latencies add up; the first
    /// terminal fault that fires wins, and later ones are not consumed.
    pub(crate) fn decide(&mut self, endpoint: Endpoint) -> FaultDecision {
        let mut d = FaultDecision::default();
        let mut rng = rand::thread_rng();
        for f in self.active.iter_mut() {
            if !f.spec.target.matches(endpoint) {
                continue;
            }
            let terminal = !matches!(f.spec.kind, FaultKind::Latency(_));
            if terminal && d.action.is_some() {
                continue;
            }
            let fires = match f.spec.trigger {
                FaultTrigger::Count(_) => f.remaining > 0,
                FaultTrigger::Rate(r) => rng.gen_bool(r),
            };
            if !fires {
                continue;
            }
            if let FaultTrigger::Count(_) = f.spec.trigger {
                f.remaining -= 1;
            }
            d.served.push(f.spec.counter());
            match &f.spec.kind {
                FaultKind::Latency(l) => d.latency = d.latency.saturating_add(*l),
                FaultKind::Status {
                    status,
                    retry_after_secs,
                } => {
                    d.action = Some(FaultAction::Status {
                        status: *status,
                        retry_after_secs: *retry_after_secs,
                    })
                }
                FaultKind::Hang(h) => d.action = Some(FaultAction::Hang(*h)),
                FaultKind::Reset => d.action = Some(FaultAction::Reset),
                FaultKind::LoseAnswer => d.action = Some(FaultAction::LoseAnswer),
            }
        }
        self.active
            .retain(|f| !matches!(f.spec.trigger, FaultTrigger::Count(_)) || f.remaining > 0);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_faults_fire_n_times_on_their_target() {
        let mut t = FaultTable::default();
        t.add(FaultSpec::status(503, FaultTarget::Mint, 2)).unwrap();
        assert_eq!(t.decide(Endpoint::Refresh).action, None);
        for _ in 0..2 {
            assert!(matches!(
                t.decide(Endpoint::Mint).action,
                Some(FaultAction::Status { status: 503, .. })
            ));
        }
        assert_eq!(t.decide(Endpoint::Mint), FaultDecision::default());
        assert!(t.list().is_empty());
    }

    #[test]
    fn latency_adds_and_first_terminal_wins() {
        let mut t = FaultTable::default();
        let lat = FaultKind::Latency(Duration::from_millis(10));
        t.add(FaultSpec::next(lat.clone(), FaultTarget::All, 1))
            .unwrap();
        t.add(FaultSpec::next(lat, FaultTarget::Jwks, 1)).unwrap();
        t.add(FaultSpec::next(FaultKind::Reset, FaultTarget::All, 1))
            .unwrap();
        t.add(FaultSpec::status(500, FaultTarget::All, 1)).unwrap();
        let d = t.decide(Endpoint::Jwks);
        assert_eq!(d.latency, Duration::from_millis(20));
        assert_eq!(d.action, Some(FaultAction::Reset));
        assert_eq!(d.served, vec!["latency", "latency", "reset"]);
        // The 500 was not consumed.
        assert!(matches!(
            t.decide(Endpoint::Jwks).action,
            Some(FaultAction::Status { status: 500, .. })
        ));
    }

    #[test]
    fn rate_zero_and_one() {
        let mut t = FaultTable::default();
        t.add(FaultSpec::rate(FaultKind::Reset, FaultTarget::All, 0.0))
            .unwrap();
        assert_eq!(t.decide(Endpoint::Mint).action, None);
        t.clear();
        t.add(FaultSpec::rate(FaultKind::Reset, FaultTarget::All, 1.0))
            .unwrap();
        for _ in 0..5 {
            assert_eq!(t.decide(Endpoint::Mint).action, Some(FaultAction::Reset));
        }
        assert!(t
            .add(FaultSpec::rate(FaultKind::Reset, FaultTarget::All, 1.5))
            .is_err());
    }

    #[test]
    fn json_forms() {
        let s = FaultSpec::from_json(&json!({"kind": "status", "status": 429})).unwrap();
        assert_eq!(
            s.kind,
            FaultKind::Status {
                status: 429,
                retry_after_secs: Some(1)
            }
        );
        assert_eq!(s.trigger, FaultTrigger::Count(1));
        assert_eq!(s.target, FaultTarget::All);
        let h = FaultSpec::from_json(
            &json!({"kind": "hang", "secs": 2, "target": "refresh", "rate": 0.5}),
        )
        .unwrap();
        assert_eq!(h.kind, FaultKind::Hang(Duration::from_secs(2)));
        assert_eq!(FaultSpec::from_json(&h.to_json()).unwrap(), h);
        let lost =
            FaultSpec::from_json(&json!({"kind": "lose_answer", "target": "refresh"})).unwrap();
        assert_eq!(
            lost,
            FaultSpec::next(FaultKind::LoseAnswer, FaultTarget::Refresh, 1)
        );
        assert_eq!(FaultSpec::from_json(&lost.to_json()).unwrap(), lost);
        for bad in [
            json!({"kind": "nope"}),
            json!({"kind": "status"}),
            json!({"kind": "status", "status": 200}),
            json!({"kind": "hang"}),
            json!({"kind": "reset", "count": 1, "rate": 0.1}),
            json!({"kind": "reset", "extra": 1}),
            json!({"kind": "hang", "secs": 1e300}),
            json!({"kind": "latency", "secs": -1}),
            json!({"kind": "latency", "secs": 2, "ms": 5}),
        ] {
            assert!(FaultSpec::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn huge_latencies_saturate_instead_of_overflowing() {
        let mut t = FaultTable::default();
        for _ in 0..2 {
            let huge = FaultSpec::from_json(&json!({"kind": "latency", "secs": 1.5e19})).unwrap();
            t.add(huge).unwrap();
        }
        assert_eq!(t.decide(Endpoint::Mint).latency, Duration::MAX);
    }
}
