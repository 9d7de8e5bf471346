//! Access control: which peer (by the uid/gid the kernel reports for the socket, SO_PEERCRED)
//! may use which op on which profile.
//!
//! Owns the `[[access]]` rule model ([`AccessRule`], embedded by the config module), its
//! compiled form ([`Rules`]: user and group names resolved to ids at load time, from
//! `/etc/passwd` and `/etc/group`), the per-peer view ([`Grants`]) and the peer's identity
//! ([`PeerCred`], executable path for audit records).
//!
//! Policy: deny by default; a rule applies when every principal it names (`user`, `uid`,
//! `group`, `gid`) matches the peer; it then allows its `ops` on its `profiles`. `"*"` in
//! `ops` means every op except the two that use the private key on the client's behalf,
//! `sign_challenge` and `stamp`, which must be named: a challenge signature lets its holder
//! mint access *and refresh* tokens outside the agent (the refresh token is meant never to
//! leave it), and a stamp signs a Turnkey payload. Neither root nor the agent's own uid is
//! special. `ping` reveals nothing and is open to every peer that can connect.
//!
//! A group matches when it is the peer's primary gid (what SO_PEERCRED reports), or when the
//! peer's uid belongs to a user listed as a member of the group in `/etc/group`.
//! Supplementary groups of the peer process itself are not consulted.
//!
//! [`Rules`] is immutable; reloads build a new one (see `server::State::reload_rules`).
//! Nothing here blocks except [`Rules::compile`] (reads two small files) and
//! [`PeerCred::exe`] (one readlink in /proc).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::protocol::Op;

/// One `[[access]]` rule of the config file.
///
/// ```toml
/// [[access]]
/// group = "traders"
/// ops = "*"                 # every op except sign_challenge and stamp
/// profiles = ["prod"]
///
/// [[access]]
/// user = "defi-bot"
/// ops = ["token", "stamp"]  # sign_challenge and stamp must be named
/// profiles = "*"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// A user name, resolved to a uid when the rules are loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// A group name, resolved to a gid (and its member list) when the rules are loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Op names, or `"*"` for every op except `sign_challenge` and `stamp`.
    pub ops: Selector,
    /// Profile names, or `"*"` for every profile.
    pub profiles: Selector,
}

/// `"*"` or a list of names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    All,
    List(Vec<String>),
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Selector::All => s.serialize_str("*"),
            Selector::List(names) => names.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Selector;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"*\" or a list of names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Selector, E> {
                if v == "*" {
                    Ok(Selector::All)
                } else {
                    Err(E::custom(format!(
                        "expected \"*\" or a list such as [\"{v}\"], found the string \"{v}\""
                    )))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Selector, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(Selector::List(names))
            }
        }
        d.deserialize_any(V)
    }
}

/// A set of ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpSet(u16);

impl OpSet {
    /// What `"*"` grants: every op except those that sign for the client (see the module
    /// docs), `sign_challenge` and `stamp`.
    pub fn star() -> OpSet {
        let mut set = OpSet::default();
        for op in Op::ALL {
            if !matches!(op, Op::SignChallenge | Op::Stamp) {
                set.insert(op);
            }
        }
        set
    }

    pub fn insert(&mut self, op: Op) {
        self.0 |= 1 << op.index();
    }

    pub fn contains(self, op: Op) -> bool {
        self.0 & (1 << op.index()) != 0
    }
}

/// The identity of a connected peer, as the kernel reported it when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl PeerCred {
    /// The peer's executable (`/proc/<pid>/exe`), best effort, for audit records. The pid may
    /// have been reused by then; this is a hint for humans, never used for decisions.
    pub fn exe(&self) -> Option<PathBuf> {
        let pid = self.pid.filter(|p| *p > 0)?;
        std::fs::read_link(format!("/proc/{pid}/exe")).ok()
    }
}

/// Why rules could not be loaded; lists every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid [[access]] rules: {}", .problems.join("; "))]
pub struct AuthzError {
    pub problems: Vec<String>,
}

/// Users and groups, parsed from `/etc/passwd` and `/etc/group` formats.
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    /// (name, uid)
    users: Vec<(String, u32)>,
    /// (name, gid, member user names)
    groups: Vec<(String, u32, Vec<String>)>,
}

impl UserDb {
    /// Reads `/etc/passwd` and `/etc/group`. Names that exist only in a directory service
    /// (LDAP, sssd) are not seen: use `uid`/`gid` for those.
    pub fn system() -> Result<UserDb, AuthzError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|e| AuthzError {
                problems: vec![format!("cannot read {path}: {e}")],
            })
        };
        Ok(UserDb::parse(&read("/etc/passwd")?, &read("/etc/group")?))
    }

    /// Parses the text of a passwd and a group file. Malformed lines are skipped.
    pub fn parse(passwd: &str, group: &str) -> UserDb {
        let fields = |line: &str| line.split(':').map(str::to_owned).collect::<Vec<_>>();
        let users = passwd
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(fields)
            .filter_map(|f| Some((f.first()?.clone(), f.get(2)?.parse().ok()?)))
            .collect();
        let groups = group
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(fields)
            .filter_map(|f| {
                let members = f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                Some((f.first()?.clone(), f.get(2)?.parse().ok()?, members))
            })
            .collect();
        UserDb { users, groups }
    }

    /// The uid of user `name`.
    pub fn uid(&self, name: &str) -> Option<u32> {
        self.users.iter().find(|(n, _)| n == name).map(|(_, u)| *u)
    }

    /// The gid of group `name`.
    pub fn gid(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, g, _)| *g)
    }

    /// The uids of the users listed as members of group `gid`.
    fn member_uids(&self, gid: u32) -> Vec<u32> {
        self.groups
            .iter()
            .filter(|(_, g, _)| *g == gid)
            .flat_map(|(_, _, members)| members.iter().filter_map(|m| self.uid(m)))
            .collect()
    }
}

#[derive(Debug, Clone)]
enum Profiles {
    All,
    List(Vec<String>),
}

#[derive(Debug, Clone)]
struct GroupMatch {
    gid: u32,
    member_uids: Vec<u32>,
}

#[derive(Debug, Clone)]
struct Compiled {
    uid: Option<u32>,
    group: Option<GroupMatch>,
    ops: OpSet,
    profiles: Profiles,
}

impl Compiled {
    fn matches(&self, peer: &PeerCred) -> bool {
        if self.uid.is_some_and(|uid| uid != peer.uid) {
            return false;
        }
        if let Some(g) = &self.group {
            if g.gid != peer.gid && !g.member_uids.contains(&peer.uid) {
                return false;
            }
        }
        true
    }

    fn allows_profile(&self, profile: &str) -> bool {
        match &self.profiles {
            Profiles::All => true,
            Profiles::List(names) => names.iter().any(|n| n == profile),
        }
    }
}

/// Compiled access rules: immutable, cheap to share.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Compiled>,
}

impl Rules {
    /// No rule: everything but `ping` is refused.
    pub fn deny_all() -> Rules {
        Rules::default()
    }

    /// Compiles `rules`, resolving names with the system's `/etc/passwd` and `/etc/group`.
    pub fn compile(rules: &[AccessRule]) -> Result<Rules, AuthzError> {
        Rules::compile_with(rules, &UserDb::system()?)
    }

    /// Compiles `rules`, resolving names with `db`. Reports every problem at once.
    pub fn compile_with(rules: &[AccessRule], db: &UserDb) -> Result<Rules, AuthzError> {
        let mut problems = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        for (index, rule) in rules.iter().enumerate() {
            let n = index + 1;
            let mut problem = |text: String| problems.push(format!("rule {n}: {text}"));
            if rule.user.is_none()
                && rule.uid.is_none()
                && rule.group.is_none()
                && rule.gid.is_none()
            {
                problem("names no user, uid, group or gid (a rule for everyone is not allowed; use the socket's group)".into());
            }
            let mut uid = rule.uid;
            if let Some(name) = &rule.user {
                match db.uid(name) {
                    Some(found) if uid.is_some_and(|u| u != found) => problem(format!(
                        "user `{name}` has uid {found}, but the rule also says uid = {}",
                        uid.unwrap_or_default()
                    )),
                    Some(found) => uid = Some(found),
                    None => problem(format!(
                        "user `{name}` not found in /etc/passwd (for directory users, give `uid`)"
                    )),
                }
            }
            let mut gid = rule.gid;
            if let Some(name) = &rule.group {
                match db.gid(name) {
                    Some(found) if gid.is_some_and(|g| g != found) => problem(format!(
                        "group `{name}` has gid {found}, but the rule also says gid = {}",
                        gid.unwrap_or_default()
                    )),
                    Some(found) => gid = Some(found),
                    None => problem(format!(
                        "group `{name}` not found in /etc/group (for directory groups, give `gid`)"
                    )),
                }
            }
            let mut ops = OpSet::default();
            match &rule.ops {
                Selector::All => ops = OpSet::star(),
                Selector::List(names) if names.is_empty() => problem("`ops` is empty".into()),
                Selector::List(names) => {
                    for name in names {
                        if name == "*" {
                            let star = OpSet::star();
                            ops = OpSet(ops.0 | star.0);
                        } else if let Some(op) = Op::from_name(name) {
                            ops.insert(op);
                        } else {
                            problem(format!(
                                "unknown op `{name}` (known: ping, token, watch, sign_challenge, \
                                 stamp, public_key, status, or \"*\")"
                            ));
                        }
                    }
                }
            }
            let profiles = match &rule.profiles {
                Selector::All => Profiles::All,
                Selector::List(names) if names.is_empty() => {
                    problem("`profiles` is empty".into());
                    Profiles::List(Vec::new())
                }
                Selector::List(names) if names.iter().any(|n| n == "*") => Profiles::All,
                Selector::List(names) => Profiles::List(names.clone()),
            };
            compiled.push(Compiled {
                uid,
                group: gid.map(|gid| GroupMatch {
                    gid,
                    member_uids: db.member_uids(gid),
                }),
                ops,
                profiles,
            });
        }
        if problems.is_empty() {
            Ok(Rules { rules: compiled })
        } else {
            Err(AuthzError { problems })
        }
    }

    /// The part of these rules that applies to `peer`.
    pub fn grants(self: &Arc<Self>, peer: &PeerCred) -> Grants {
        let matched = (0..self.rules.len())
            .filter(|&i| self.rules[i].matches(peer))
            .collect();
        Grants {
            rules: Arc::clone(self),
            matched,
        }
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// What one peer may do: the rules that matched it. Cheap to query per request.
#[derive(Debug, Clone)]
pub struct Grants {
    rules: Arc<Rules>,
    matched: Vec<usize>,
}

impl Grants {
    /// May the peer use `op` on `profile`? (`ping` always; ops without a profile, such as
    /// `status` with none given, need the op on at least one profile.)
    pub fn allows(&self, op: Op, profile: Option<&str>) -> bool {
        if op == Op::Ping {
            return true;
        }
        self.matched.iter().any(|&i| {
            let rule = &self.rules.rules[i];
            rule.ops.contains(op) && profile.is_none_or(|p| rule.allows_profile(p))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n# comment\nbroken line\n";
    const GROUP: &str = "root:x:0:\nalice:x:1000:\nbob:x:1001:\ntraders:x:2000:alice\n";

    fn rule(toml_text: &str) -> AccessRule {
        toml::from_str(toml_text).unwrap()
    }

    fn grants(rules: &[AccessRule], uid: u32, gid: u32) -> Grants {
        let db = UserDb::parse(PASSWD, GROUP);
        let rules = Arc::new(Rules::compile_with(rules, &db).unwrap());
        rules.grants(&PeerCred {
            uid,
            gid,
            pid: None,
        })
    }

    #[test]
    fn deny_by_default_and_root_is_not_special() {
        let g = grants(&[], 0, 0);
        assert!(!g.allows(Op::Token, Some("prod")));
        assert!(g.allows(Op::Ping, None));
        let r = rule("user = \"alice\"\nops = \"*\"\nprofiles = \"*\"");
        let g = grants(std::slice::from_ref(&r), 0, 0);
        assert!(!g.allows(Op::Token, Some("prod")));
        let g = grants(&[r], 1000, 1000);
        assert!(g.allows(Op::Token, Some("prod")));
    }

    #[test]
    fn star_excludes_sign_challenge_and_stamp_unless_named() {
        let r = rule("uid = 1000\nops = \"*\"\nprofiles = [\"prod\"]");
        let g = grants(&[r], 1000, 1000);
        for op in [Op::Token, Op::Watch, Op::PublicKey, Op::Status] {
            assert!(g.allows(op, Some("prod")), "{op}");
        }
        assert!(!g.allows(Op::SignChallenge, Some("prod")));
        assert!(!g.allows(Op::Stamp, Some("prod")));
        assert!(!g.allows(Op::Token, Some("uat")));
        assert!(g.allows(Op::Status, None));
        let r = rule("uid = 1000\nops = [\"*\", \"sign_challenge\"]\nprofiles = [\"prod\"]");
        let g = grants(&[r], 1000, 1000);
        assert!(g.allows(Op::SignChallenge, Some("prod")));
        assert!(!g.allows(Op::Stamp, Some("prod")));
        let r = rule("uid = 1000\nops = [\"*\", \"stamp\"]\nprofiles = [\"prod\"]");
        let g = grants(&[r], 1000, 1000);
        assert!(g.allows(Op::Stamp, Some("prod")));
        assert!(!g.allows(Op::SignChallenge, Some("prod")));
    }

    #[test]
    fn group_matches_primary_gid_or_listed_membership() {
        let r = rule("group = \"traders\"\nops = [\"token\"]\nprofiles = \"*\"");
        assert!(grants(std::slice::from_ref(&r), 1000, 1000).allows(Op::Token, Some("p")));
        assert!(grants(std::slice::from_ref(&r), 1234, 2000).allows(Op::Token, Some("p")));
        assert!(!grants(&[r], 1001, 1001).allows(Op::Token, Some("p")));
    }

    #[test]
    fn every_given_principal_must_match() {
        let r = rule("uid = 1000\ngid = 5\nops = [\"token\"]\nprofiles = \"*\"");
        assert!(!grants(std::slice::from_ref(&r), 1000, 1000).allows(Op::Token, Some("p")));
        assert!(grants(&[r], 1000, 5).allows(Op::Token, Some("p")));
    }

    #[test]
    fn reports_every_problem() {
        let rules = [
            rule("user = \"nobody-here\"\nops = [\"tokn\"]\nprofiles = \"*\""),
            rule("ops = \"*\"\nprofiles = []"),
        ];
        let err = Rules::compile_with(&rules, &UserDb::parse(PASSWD, GROUP)).unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
        assert!(err
            .to_string()
            .contains("rule 1: user `nobody-here` not found"));
        assert!(err.to_string().contains("unknown op `tokn`"));
        assert!(err.to_string().contains("rule 2: names no user"));
    }

    #[test]
    fn selector_parsing_is_strict() {
        assert!(
            toml::from_str::<AccessRule>("uid = 1\nops = \"token\"\nprofiles = \"*\"").is_err()
        );
        assert!(
            toml::from_str::<AccessRule>("uid = 1\nops = \"*\"\nprofiles = \"*\"\nextra = 1")
                .is_err()
        );
    }
}
