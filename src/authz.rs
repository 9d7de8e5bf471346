//! Access control: which peer (by the uid/gid the kernel reports for the socket, SO_PEERCRED)
//! may use which op on which profile.
//!
//! Owns the `[[access]]` rule model ([`AccessRule`], embedded by the config module), its
//! compiled form ([`Rules`]: user and group names resolved to ids at load time), the per-peer
//! view ([`Grants`]) and the peer's identity ([`PeerCred`], executable path for audit records).
//!
//! Names resolve as `id` and `getent` resolve them: from `/etc/passwd` and `/etc/group` first,
//! then, for a name those files lack, through NSS (sssd, nss-systemd, LDAP...) by running
//! `getent` ([`nss`]). A name goes to getent only if it is a plausible account name (no
//! leading `-`, no whitespace, `:`, `,` or control character, not a number), so a config
//! cannot pass options to it. A user or group found nowhere, or an NSS lookup that fails or
//! times out, is a problem of the rules: the load fails and says what to do.
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
//! peer's uid belongs to a user listed as a member of the group: for `group = "name"`, the
//! members of the entry that resolved the name (`/etc/group`, else `getent group name`); for
//! a bare `gid`, the members listed for it in `/etc/group`, else by `getent group <gid>` (a
//! gid that NSS does not know either has no listed members). Member names resolve to uids like
//! `user` names (files, then NSS); members found nowhere are left out. Supplementary groups
//! of the peer process itself are not consulted.
//!
//! [`Rules`] is immutable; reloads build a new one (see `server::State::reload_rules`).
//! Nothing here blocks except [`Rules::compile`] (reads two small files, and runs getent for
//! names they lack: each run is killed after [`nss::Getent::TIMEOUT`], and after one NSS
//! failure the rest of that compile asks NSS nothing, so a hung backend costs one timeout)
//! and [`PeerCred::exe`] (one readlink in /proc).

pub mod nss;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::protocol::Op;

use nss::{Database, Getent, NameService, NssError};

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
    /// A user name, resolved to a uid when the rules are loaded (`/etc/passwd`, then NSS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// A group name, resolved to a gid and its member list when the rules are loaded
    /// (`/etc/group`, then NSS).
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
    /// Some name could not be resolved because NSS failed, hung or was too slow (rather
    /// than answering "no such name"): likely transient, e.g. sssd not up yet.
    pub nss_unavailable: bool,
}

/// Users and groups, parsed from `/etc/passwd` and `/etc/group` formats (the files, or what
/// getent printed).
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    /// (name, uid)
    users: Vec<(String, u32)>,
    /// (name, gid, member user names)
    groups: Vec<(String, u32, Vec<String>)>,
}

impl UserDb {
    /// Reads `/etc/passwd` and `/etc/group`. Names that exist only in a directory service
    /// (LDAP, sssd) are not in them: [`Rules::compile`] asks NSS for those.
    pub fn system() -> Result<UserDb, AuthzError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|e| AuthzError {
                problems: vec![format!("cannot read {path}: {e}")],
                nss_unavailable: false,
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

    /// The first user whose name is `name` but for ASCII case, as a case-insensitive
    /// directory (sssd's default for AD) spells it: its name and uid.
    fn user_any_case(&self, name: &str) -> Option<&(String, u32)> {
        self.users
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The gid of group `name`.
    pub fn gid(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, g, _)| *g)
    }

    /// Whether a group has gid `gid`.
    fn has_gid(&self, gid: u32) -> bool {
        self.groups.iter().any(|(_, g, _)| *g == gid)
    }

    /// The names listed as members of the groups with gid `gid` (several names may share it).
    fn member_names(&self, gid: u32) -> Vec<String> {
        self.groups
            .iter()
            .filter(|(_, g, _)| *g == gid)
            .flat_map(|(_, _, members)| members.iter().cloned())
            .collect()
    }
}

/// Why a name could not be resolved (found nowhere is `Ok(None)` instead).
enum Unresolved {
    /// Not a plausible account name: never passed to NSS.
    Implausible(&'static str),
    /// NSS was asked and could not answer.
    Nss(NssError),
    /// NSS was not asked: an earlier lookup of this compile failed.
    NssSkipped,
    /// NSS was not asked: the lookups of this compile have used up [`NSS_BUDGET`].
    NssBudget,
}

/// The most time the NSS lookups of one compile may take together (each getent run is
/// also killed after its own timeout): a slow backend must not hold a reload, and the
/// signals it would answer, for a call per name.
const NSS_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

impl Unresolved {
    /// A problem line about `what` (``user `x` ``), which `file` lacks; `give` is the field
    /// to use instead.
    fn describe(&self, what: &str, file: &str, give: &str) -> String {
        match self {
            Unresolved::Implausible(why) => format!(
                "{what} is not a valid account name ({why}): check the name, or give `{give}`"
            ),
            Unresolved::Nss(e) => {
                format!("{what} is not in {file}, and the NSS lookup failed: {e}; or give `{give}`")
            }
            Unresolved::NssSkipped => format!(
                "{what} is not in {file}, and NSS was not asked again after a lookup failed: \
                 fix NSS, or give `{give}`"
            ),
            Unresolved::NssBudget => format!(
                "{what} is not in {file}, and NSS was not asked: this load's lookups already \
                 took over {} s (a slow NSS backend); fix NSS, or give `{give}`",
                NSS_BUDGET.as_secs()
            ),
        }
    }
}

/// A group as resolved: its gid and the names listed as its members.
struct GroupEntry {
    gid: u32,
    members: Vec<String>,
}

/// Resolves the names of one compile: the files first, then NSS. Remembers what NSS said about
/// users (group members recur across rules) and, after the first NSS failure, asks it nothing
/// more, so that a hung backend costs one timeout per load rather than one per name; and
/// once the lookups have taken [`NSS_BUDGET`] together, none is started.
struct Resolver<'a> {
    files: &'a UserDb,
    nss: &'a dyn NameService,
    nss_uids: HashMap<String, Option<u32>>,
    /// NSS failed, or the budget ran out: the names left unresolved may exist.
    failed: bool,
    started: std::time::Instant,
}

impl<'a> Resolver<'a> {
    /// Names per getent run for group members (far below any argument-size limit).
    const BATCH: usize = 200;

    fn new(files: &'a UserDb, nss: &'a dyn NameService) -> Resolver<'a> {
        Resolver {
            files,
            nss,
            nss_uids: HashMap::new(),
            failed: false,
            started: std::time::Instant::now(),
        }
    }

    fn ask(&mut self, db: Database, keys: &[&str]) -> Result<String, Unresolved> {
        if self.failed {
            return Err(Unresolved::NssSkipped);
        }
        if self.started.elapsed() > NSS_BUDGET {
            self.failed = true;
            return Err(Unresolved::NssBudget);
        }
        self.nss.getent(db, keys).map_err(|e| {
            self.failed = true;
            Unresolved::Nss(e)
        })
    }

    /// The uid of user `name`; `Ok(None)` when neither the files nor NSS know it.
    fn uid(&mut self, name: &str) -> Result<Option<u32>, Unresolved> {
        if let Some(uid) = self.files.uid(name) {
            return Ok(Some(uid));
        }
        nss::plausible_name(name).map_err(Unresolved::Implausible)?;
        self.ask_users(&[name])?;
        Ok(self.nss_uids.get(name).copied().flatten())
    }

    /// Asks NSS for those of `names` it was not asked about yet, in batches.
    fn ask_users(&mut self, names: &[&str]) -> Result<(), Unresolved> {
        let mut todo: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.nss_uids.contains_key(*n))
            .collect();
        todo.sort_unstable();
        todo.dedup();
        let mut ambiguous = Vec::new();
        for batch in todo.chunks(Self::BATCH) {
            let answer = UserDb::parse(&self.ask(Database::Passwd, batch)?, "");
            for name in batch {
                // A case-insensitive directory (sssd's default for AD) answers `Alice` with
                // `alice`; an exact match wins when both are listed.
                let uid = match answer.uid(name) {
                    Some(uid) => Some(uid),
                    None => match answer.user_any_case(name) {
                        // Also the exact answer to another name of the batch (`Bob` next to
                        // `bob`): whether `Bob` is that account (a case-insensitive
                        // directory) or nobody (a case-sensitive one), only NSS asked about
                        // `Bob` alone can say.
                        Some((n, _)) if batch.contains(&n.as_str()) => {
                            ambiguous.push(*name);
                            continue;
                        }
                        other => other.map(|u| u.1),
                    },
                };
                self.nss_uids.insert((*name).to_owned(), uid);
            }
        }
        for name in ambiguous {
            let answer = UserDb::parse(&self.ask(Database::Passwd, &[name])?, "");
            // Asked alone: whatever entry comes back is the directory's answer for `name`.
            let uid = answer
                .uid(name)
                .or_else(|| answer.user_any_case(name).map(|u| u.1));
            self.nss_uids.insert(name.to_owned(), uid);
        }
        Ok(())
    }

    /// Group `name` and its members; `Ok(None)` when neither the files nor NSS know it.
    fn group(&mut self, name: &str) -> Result<Option<GroupEntry>, Unresolved> {
        if let Some(gid) = self.files.gid(name) {
            return Ok(Some(GroupEntry {
                gid,
                members: self.files.member_names(gid),
            }));
        }
        nss::plausible_name(name).map_err(Unresolved::Implausible)?;
        let answer = UserDb::parse("", &self.ask(Database::Group, &[name])?);
        let mut groups = answer.groups.into_iter();
        // Asked for one name, NSS answers with that group (spelt as the directory spells it).
        Ok(groups
            .find(|(n, ..)| n.eq_ignore_ascii_case(name))
            .map(|(_, gid, members)| GroupEntry { gid, members }))
    }

    /// The names listed as members of group `gid`: from `/etc/group` when it has the gid,
    /// else from `getent group <gid>`; none when neither knows the gid.
    fn gid_members(&mut self, gid: u32) -> Result<Vec<String>, Unresolved> {
        if self.files.has_gid(gid) {
            return Ok(self.files.member_names(gid));
        }
        let key = gid.to_string();
        let answer = UserDb::parse("", &self.ask(Database::Group, &[key.as_str()])?);
        Ok(answer.member_names(gid))
    }

    /// The uids of the users named in `members`: the files first, then NSS. Names found
    /// nowhere, and names that are no plausible account name, are left out.
    fn member_uids(&mut self, members: &[String]) -> Result<Vec<u32>, Unresolved> {
        let elsewhere: Vec<&str> = members
            .iter()
            .map(String::as_str)
            .filter(|m| self.files.uid(m).is_none() && nss::plausible_name(m).is_ok())
            .collect();
        self.ask_users(&elsewhere)?;
        let mut uids: Vec<u32> = members
            .iter()
            .filter_map(|m| {
                self.files
                    .uid(m)
                    .or_else(|| self.nss_uids.get(m.as_str()).copied().flatten())
            })
            .collect();
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }
}

/// The gid of group `name` as the system sees it (the socket's group): `/etc/group` first,
/// then NSS through getent. `Ok(None)` when neither knows it, and for an all-digit name
/// that `/etc/group` lacks (the caller reads it as a gid; it never reaches getent). `Err`
/// says why the lookup could not be made. Blocks like [`Rules::compile`].
pub fn system_group_gid(name: &str) -> Result<Option<u32>, String> {
    group_gid_with(
        name,
        &UserDb::system().map_err(|e| e.to_string())?,
        &Getent::new(),
    )
}

fn group_gid_with(
    name: &str,
    files: &UserDb,
    nss: &dyn NameService,
) -> Result<Option<u32>, String> {
    if files.gid(name).is_none() && !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    Resolver::new(files, nss)
        .group(name)
        .map(|group| group.map(|g| g.gid))
        .map_err(|e| e.describe(&format!("group `{name}`"), "/etc/group", "a numeric gid"))
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

    /// Compiles `rules`, resolving names with the system's `/etc/passwd` and `/etc/group`,
    /// then with NSS through getent. Blocks (see the module docs for how long at most).
    pub fn compile(rules: &[AccessRule]) -> Result<Rules, AuthzError> {
        Rules::compile_with(rules, &UserDb::system()?, &Getent::new())
    }

    /// Compiles `rules`, resolving names with `db` (the files), then with `nss` for names
    /// `db` lacks. Reports every problem at once.
    pub fn compile_with(
        rules: &[AccessRule],
        db: &UserDb,
        nss: &dyn NameService,
    ) -> Result<Rules, AuthzError> {
        let mut resolver = Resolver::new(db, nss);
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
                match resolver.uid(name) {
                    Ok(Some(found)) if uid.is_some_and(|u| u != found) => problem(format!(
                        "user `{name}` has uid {found}, but the rule also says uid = {}",
                        uid.unwrap_or_default()
                    )),
                    Ok(Some(found)) => uid = Some(found),
                    Ok(None) => problem(format!(
                        "user `{name}` not found in /etc/passwd nor through NSS (getent passwd \
                         {name}): check the name, or give `uid`"
                    )),
                    Err(e) => problem(e.describe(&format!("user `{name}`"), "/etc/passwd", "uid")),
                }
            }
            let mut gid = rule.gid;
            let mut members = None;
            if let Some(name) = &rule.group {
                match resolver.group(name) {
                    Ok(Some(found)) if gid.is_some_and(|g| g != found.gid) => problem(format!(
                        "group `{name}` has gid {}, but the rule also says gid = {}",
                        found.gid,
                        gid.unwrap_or_default()
                    )),
                    Ok(Some(found)) => {
                        gid = Some(found.gid);
                        members = Some(found.members);
                    }
                    Ok(None) => problem(format!(
                        "group `{name}` not found in /etc/group nor through NSS (getent group \
                         {name}): check the name, or give `gid`"
                    )),
                    Err(e) => problem(e.describe(&format!("group `{name}`"), "/etc/group", "gid")),
                }
            }
            let mut group = None;
            if let Some(gid) = gid {
                let members = match members {
                    Some(members) => Ok(members),
                    None => resolver.gid_members(gid),
                };
                match members.and_then(|members| resolver.member_uids(&members)) {
                    Ok(member_uids) => group = Some(GroupMatch { gid, member_uids }),
                    Err(e) => problem(e.describe(
                        &format!("the membership of group {gid}"),
                        "/etc/group and /etc/passwd",
                        "uid",
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
                group,
                ops,
                profiles,
            });
        }
        if problems.is_empty() {
            Ok(Rules { rules: compiled })
        } else {
            Err(AuthzError {
                problems,
                nss_unavailable: resolver.failed,
            })
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

    /// An NSS double: answers from its own passwd and group texts, by name (ignoring ASCII
    /// case, as sssd does by default for AD, unless `exact_names`) or by numeric id, or fails
    /// with `fail`; records every lookup.
    #[derive(Default)]
    struct FakeNss {
        passwd: &'static str,
        group: &'static str,
        fail: Option<NssError>,
        exact_names: bool,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl NameService for FakeNss {
        fn getent(&self, db: Database, keys: &[&str]) -> Result<String, NssError> {
            self.asked
                .borrow_mut()
                .push(format!("{db} {}", keys.join(" ")));
            if let Some(e) = &self.fail {
                return Err(e.clone());
            }
            let text = match db {
                Database::Passwd => self.passwd,
                Database::Group => self.group,
            };
            Ok(text
                .lines()
                .filter(|l| {
                    let fields: Vec<&str> = l.split(':').collect();
                    keys.iter().any(|k| {
                        let same_name = if self.exact_names {
                            *k == fields[0]
                        } else {
                            k.eq_ignore_ascii_case(fields[0])
                        };
                        same_name || fields.get(2) == Some(k)
                    })
                })
                .map(|l| format!("{l}\n"))
                .collect())
        }
    }

    impl FakeNss {
        fn asked(&self) -> Vec<String> {
            self.asked.borrow().clone()
        }
    }

    const NSS_PASSWD: &str = "carol:x:5001:5001::/home/carol:/bin/sh\ndave:x:5002:5002::/home/dave:/bin/sh\nerin:x:5003:5003::/home/erin:/bin/sh\n";
    const NSS_GROUP: &str = "quants:x:6000:carol,dave,alice,ghost\n";

    fn directory() -> FakeNss {
        FakeNss {
            passwd: NSS_PASSWD,
            group: NSS_GROUP,
            ..FakeNss::default()
        }
    }

    fn peer(uid: u32, gid: u32) -> PeerCred {
        PeerCred {
            uid,
            gid,
            pid: None,
        }
    }

    fn grants(rules: &[AccessRule], uid: u32, gid: u32) -> Grants {
        let db = UserDb::parse(PASSWD, GROUP);
        let nss = FakeNss::default();
        let rules = Arc::new(Rules::compile_with(rules, &db, &nss).unwrap());
        rules.grants(&peer(uid, gid))
    }

    #[test]
    fn the_socket_group_resolves_from_the_files_then_nss_and_digits_stay_a_gid() {
        let db = UserDb::parse(PASSWD, GROUP);
        let nss = directory();
        assert_eq!(group_gid_with("traders", &db, &nss), Ok(Some(2000)));
        assert!(
            nss.asked().is_empty(),
            "the files knew it: {:?}",
            nss.asked()
        );
        assert_eq!(group_gid_with("quants", &db, &nss), Ok(Some(6000)));
        assert_eq!(nss.asked(), ["group quants"]);
        assert_eq!(group_gid_with("nobody-here", &db, &nss), Ok(None));
        assert_eq!(group_gid_with("65534", &db, &nss), Ok(None));
        assert_eq!(
            group_gid_with("-s", &db, &nss).map_err(|e| e.contains("not a valid")),
            Err(true)
        );
        assert_eq!(
            nss.asked(),
            ["group quants", "group nobody-here"],
            "digits and options never reach getent"
        );
        let failing = FakeNss {
            fail: Some(NssError::Failed {
                command: "getent group x".into(),
                status: "exit status: 3".into(),
            }),
            ..FakeNss::default()
        };
        let err = group_gid_with("quants", &db, &failing).unwrap_err();
        assert!(err.contains("NSS lookup failed"), "{err}");
    }

    #[test]
    fn an_nss_failure_or_a_spent_budget_is_reported_as_such_a_missing_name_is_not() {
        let db = UserDb::parse(PASSWD, GROUP);
        let r = rule("user = \"carol\"\nops = [\"token\"]\nprofiles = \"*\"");
        let missing =
            Rules::compile_with(std::slice::from_ref(&r), &db, &FakeNss::default()).unwrap_err();
        assert!(!missing.nss_unavailable, "{missing:?}");
        let failing = FakeNss {
            fail: Some(NssError::Failed {
                command: "getent passwd carol".into(),
                status: "exit status: 3".into(),
            }),
            ..FakeNss::default()
        };
        let down = Rules::compile_with(&[r], &db, &failing).unwrap_err();
        assert!(down.nss_unavailable, "{down:?}");

        let nss = directory();
        let mut resolver = Resolver::new(&db, &nss);
        resolver.started -= NSS_BUDGET + std::time::Duration::from_secs(1);
        let err = resolver.uid("carol").unwrap_err();
        assert!(matches!(err, Unresolved::NssBudget));
        assert!(resolver.failed);
        assert!(nss.asked().is_empty(), "no lookup once the budget is spent");
        assert!(err
            .describe("user `carol`", "/etc/passwd", "uid")
            .contains("over 10 s"));
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
        let err = Rules::compile_with(&rules, &UserDb::parse(PASSWD, GROUP), &FakeNss::default())
            .unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
        assert!(err
            .to_string()
            .contains("rule 1: user `nobody-here` not found"));
        assert!(err.to_string().contains("unknown op `tokn`"));
        assert!(err.to_string().contains("rule 2: names no user"));
    }

    #[test]
    fn names_in_the_files_never_reach_nss() {
        let nss = directory();
        let rules = [
            rule("user = \"alice\"\nops = [\"token\"]\nprofiles = \"*\""),
            rule("group = \"traders\"\nops = [\"token\"]\nprofiles = \"*\""),
            rule("gid = 1001\nops = [\"token\"]\nprofiles = \"*\""),
        ];
        let rules = Rules::compile_with(&rules, &UserDb::parse(PASSWD, GROUP), &nss).unwrap();
        assert_eq!(rules.rules[0].uid, Some(1000));
        let group = rules.rules[1].group.as_ref().unwrap();
        assert_eq!((group.gid, group.member_uids.clone()), (2000, vec![1000]));
        assert_eq!(nss.asked(), Vec::<String>::new());
    }

    #[test]
    fn a_bare_gid_that_the_files_lack_takes_its_members_from_nss() {
        let files = UserDb::parse(PASSWD, GROUP);
        let nss = directory();
        let rules = [
            rule("gid = 6000\nops = [\"token\"]\nprofiles = \"*\""),
            rule("gid = 7000\nops = [\"status\"]\nprofiles = \"*\""),
        ];
        let compiled = Rules::compile_with(&rules, &files, &nss).unwrap();
        let quants = compiled.rules[0].group.as_ref().unwrap();
        // carol and dave from NSS, alice from the files; ghost is found nowhere.
        assert_eq!(quants.member_uids, vec![1000, 5001, 5002]);
        let unknown = compiled.rules[1].group.as_ref().unwrap();
        assert_eq!((unknown.gid, unknown.member_uids.len()), (7000, 0));
        assert_eq!(
            nss.asked(),
            ["group 6000", "passwd carol dave ghost", "group 7000"]
        );
        let compiled = Arc::new(compiled);
        assert!(compiled
            .grants(&peer(5001, 5001))
            .allows(Op::Token, Some("p")));
        assert!(compiled
            .grants(&peer(4242, 6000))
            .allows(Op::Token, Some("p")));
        assert!(!compiled
            .grants(&peer(5003, 5003))
            .allows(Op::Token, Some("p")));

        let failing = FakeNss {
            fail: Some(NssError::Failed {
                command: "getent group 6000".into(),
                status: "exit status: 3".into(),
            }),
            ..FakeNss::default()
        };
        let err = Rules::compile_with(&rules[..1], &files, &failing).unwrap_err();
        assert!(err.nss_unavailable, "{err:?}");
        assert!(
            err.to_string()
                .contains("the membership of group 6000 is not in /etc/group"),
            "{err}"
        );
    }

    #[test]
    fn names_missing_from_the_files_come_from_nss() {
        // traders (in the files) lists erin, whom only the directory knows.
        let group = "alice:x:1000:\ntraders:x:2000:alice,erin\n";
        let nss = directory();
        let rules = [
            rule("user = \"carol\"\nops = [\"token\"]\nprofiles = \"*\""),
            rule("group = \"quants\"\nops = [\"status\"]\nprofiles = \"*\""),
            rule("group = \"traders\"\nops = [\"watch\"]\nprofiles = \"*\""),
            rule("user = \"Carol\"\nuid = 5001\nops = [\"public_key\"]\nprofiles = \"*\""),
        ];
        let rules =
            Arc::new(Rules::compile_with(&rules, &UserDb::parse(PASSWD, group), &nss).unwrap());
        assert_eq!(rules.rules[0].uid, Some(5001));
        let quants = rules.rules[1].group.as_ref().unwrap();
        // carol and dave through NSS, alice from the files, ghost nowhere (left out).
        assert_eq!(
            (quants.gid, quants.member_uids.clone()),
            (6000, vec![1000, 5001, 5002])
        );
        let traders = rules.rules[2].group.as_ref().unwrap();
        assert_eq!(traders.member_uids, vec![1000, 5003]);
        // carol was asked once (remembered); the members in one batch per group.
        assert_eq!(
            nss.asked(),
            [
                "passwd carol",
                "group quants",
                "passwd dave ghost",
                "passwd erin",
                "passwd Carol"
            ]
        );
        let dave = rules.grants(&peer(5002, 5002));
        assert!(dave.allows(Op::Status, Some("p")));
        assert!(!dave.allows(Op::Token, Some("p")));
        assert!(rules.grants(&peer(5003, 5003)).allows(Op::Watch, Some("p")));
        assert!(rules
            .grants(&peer(5001, 5001))
            .allows(Op::PublicKey, Some("p")));
    }

    /// `Finn` listed next to `finn`, whom only the directory knows: `Finn` is asked about alone
    /// before it is taken for finn, so that a stale `Finn` in another group gives finn nothing in
    /// a case-sensitive directory, and is finn in a case-insensitive one.
    #[test]
    fn a_name_that_differs_only_in_case_from_another_is_asked_about_alone() {
        const PASSWD_NSS: &str = "finn:x:5100:5100::/home/finn:/bin/sh\n";
        const GROUP_NSS: &str = "desk:x:6100:finn,Finn\nstale:x:6200:Finn\n";
        let rules = [
            rule("group = \"desk\"\nops = [\"token\"]\nprofiles = \"*\""),
            rule("group = \"stale\"\nops = [\"sign_challenge\"]\nprofiles = \"*\""),
        ];
        let files = UserDb::parse(PASSWD, GROUP);
        let members = |nss: &FakeNss| -> Vec<Vec<u32>> {
            let compiled = Rules::compile_with(&rules, &files, nss).unwrap();
            compiled
                .rules
                .iter()
                .map(|r| r.group.as_ref().unwrap().member_uids.clone())
                .collect()
        };
        let case_sensitive = FakeNss {
            passwd: PASSWD_NSS,
            group: GROUP_NSS,
            exact_names: true,
            ..FakeNss::default()
        };
        assert_eq!(members(&case_sensitive), [vec![5100], vec![]]);
        assert_eq!(
            case_sensitive.asked(),
            [
                "group desk",
                "passwd Finn finn",
                "passwd Finn",
                "group stale"
            ]
        );
        let case_insensitive = FakeNss {
            passwd: PASSWD_NSS,
            group: GROUP_NSS,
            ..FakeNss::default()
        };
        assert_eq!(members(&case_insensitive), [vec![5100], vec![5100]]);
    }

    #[test]
    fn names_found_nowhere_say_what_to_do() {
        let nss = directory();
        let rules = [
            rule("user = \"zed\"\nops = [\"token\"]\nprofiles = \"*\""),
            rule("group = \"nobody-group\"\nops = [\"token\"]\nprofiles = \"*\""),
        ];
        let err = Rules::compile_with(&rules, &UserDb::parse(PASSWD, GROUP), &nss).unwrap_err();
        assert_eq!(
            err.problems,
            [
                "rule 1: user `zed` not found in /etc/passwd nor through NSS (getent passwd zed): \
                 check the name, or give `uid`",
                "rule 2: group `nobody-group` not found in /etc/group nor through NSS (getent \
                 group nobody-group): check the name, or give `gid`",
            ]
        );
        assert_eq!(nss.asked(), ["passwd zed", "group nobody-group"]);
    }

    #[test]
    fn implausible_names_never_reach_nss() {
        let nss = directory();
        let hostile = [
            "user = \"-s\"",
            "user = \"a b\"",
            "group = \"--help\"",
            "user = \"x:0:0\"",
            "group = \"a\\u0000b\"",
            "user = \"1000\"",
            "group = \"\"",
        ];
        let rules: Vec<_> = hostile
            .iter()
            .map(|p| rule(&format!("{p}\nops = [\"token\"]\nprofiles = \"*\"")))
            .collect();
        let err = Rules::compile_with(&rules, &UserDb::parse(PASSWD, GROUP), &nss).unwrap_err();
        assert_eq!(err.problems.len(), hostile.len(), "{err}");
        for problem in &err.problems {
            assert!(problem.contains("is not a valid account name"), "{problem}");
        }
        assert!(err.problems[0].contains("user `-s` is not a valid account name (it starts with '-'): check the name, or give `uid`"), "{err}");
        // A hostile member name in the files is left out, not looked up.
        let group = "traders:x:2000:alice,-s,a b\n";
        let rules = [rule(
            "group = \"traders\"\nops = [\"token\"]\nprofiles = \"*\"",
        )];
        let rules = Rules::compile_with(&rules, &UserDb::parse(PASSWD, group), &nss).unwrap();
        assert_eq!(
            rules.rules[0].group.as_ref().unwrap().member_uids,
            vec![1000]
        );
        assert_eq!(nss.asked(), Vec::<String>::new());
    }

    #[test]
    fn a_failing_nss_is_asked_once_per_load_and_reported() {
        let nss = FakeNss {
            fail: Some(NssError::Timeout {
                command: "getent passwd carol".into(),
                db: Database::Passwd,
                secs: 5,
            }),
            ..directory()
        };
        let rules = [
            rule("user = \"carol\"\nops = [\"token\"]\nprofiles = \"*\""),
            rule("group = \"quants\"\nops = [\"token\"]\nprofiles = \"*\""),
            rule("user = \"alice\"\nops = [\"token\"]\nprofiles = \"*\""),
        ];
        let err = Rules::compile_with(&rules, &UserDb::parse(PASSWD, GROUP), &nss).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(
            err.problems[0].starts_with(
                "rule 1: user `carol` is not in /etc/passwd, and the NSS lookup failed: \
                 `getent passwd carol` gave no answer within 5 s"
            ),
            "{err}"
        );
        assert!(err.problems[0].ends_with("or give `uid`"), "{err}");
        assert_eq!(
            err.problems[1],
            "rule 2: group `quants` is not in /etc/group, and NSS was not asked again after a \
             lookup failed: fix NSS, or give `gid`"
        );
        assert_eq!(nss.asked(), ["passwd carol"]);
    }

    /// The real resolver: files that lack root (and a group, and its member) make the system's
    /// getent supply them; the ids must be the ones the system reports.
    #[test]
    fn names_missing_from_the_files_come_from_the_real_getent() {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let group = std::fs::read_to_string("/etc/group").unwrap();
        let system = UserDb::parse(&passwd, &group);
        // A group with a member that /etc/passwd has, so that the member goes through NSS too;
        // else root's group.
        let (group_name, member) = system
            .groups
            .iter()
            .find_map(|(name, _, members)| {
                let m = members
                    .iter()
                    .find(|m| m.as_str() != "root" && system.uid(m).is_some())?;
                Some((name.clone(), Some(m.clone())))
            })
            .unwrap_or_else(|| ("root".to_owned(), None));
        let hidden_users = ["root".to_owned()]
            .into_iter()
            .chain(member.clone())
            .collect::<Vec<_>>();
        let first_field = |l: &str| l.split(':').next().unwrap_or_default().to_owned();
        let files_passwd: String = passwd
            .lines()
            .filter(|l| !hidden_users.contains(&first_field(l)))
            .map(|l| format!("{l}\n"))
            .collect();
        let files_group: String = group
            .lines()
            .filter(|l| first_field(l) != group_name)
            .map(|l| format!("{l}\n"))
            .collect();
        let files = UserDb::parse(&files_passwd, &files_group);
        assert_eq!(files.uid("root"), None);
        assert_eq!(files.gid(&group_name), None);

        let getent_says = |db: &str, name: &str| -> u32 {
            let out = std::process::Command::new("getent")
                .args([db, name])
                .output()
                .unwrap();
            assert!(out.status.success(), "getent {db} {name}: {out:?}");
            let text = String::from_utf8(out.stdout).unwrap();
            // uid in passwd, gid in group: the third field either way.
            text.split(':').nth(2).unwrap().trim().parse().unwrap()
        };

        let rules = [
            rule("user = \"root\"\nops = [\"token\"]\nprofiles = \"*\""),
            rule(&format!(
                "group = \"{group_name}\"\nops = [\"token\"]\nprofiles = \"*\""
            )),
        ];
        let nss = Counting {
            inner: Getent::new(),
            asked: Default::default(),
        };
        let compiled = Rules::compile_with(&rules, &files, &nss).unwrap();
        assert_eq!(compiled.rules[0].uid, system.uid("root"));
        assert_eq!(compiled.rules[0].uid, Some(getent_says("passwd", "root")));
        let g = compiled.rules[1].group.as_ref().unwrap();
        assert_eq!(Some(g.gid), system.gid(&group_name));
        assert_eq!(g.gid, getent_says("group", &group_name));
        let asked = nss.asked.borrow().clone();
        assert_eq!(
            asked[..2],
            ["passwd root".to_owned(), format!("group {group_name}")]
        );
        if let Some(member) = &member {
            let uid = system.uid(member).unwrap();
            assert_eq!(uid, getent_says("passwd", member));
            assert!(
                g.member_uids.contains(&uid),
                "{member} ({uid}) not in {g:?}"
            );
            // The member's batch (with any member names that /etc/passwd lacks).
            assert!(asked[2].split(' ').any(|m| m == member), "{asked:?}");
        }

        // Without the fallback the same files resolve nothing: the ids above came from getent.
        let err = Rules::compile_with(&rules, &files, &FakeNss::default()).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");

        // A bare gid: the hidden group's members come from `getent group <gid>`; a gid that
        // nobody has compiles, with no members.
        let by_gid = [
            rule(&format!(
                "gid = {}\nops = [\"token\"]\nprofiles = \"*\"",
                g.gid
            )),
            rule("gid = 4242424\nops = [\"token\"]\nprofiles = \"*\""),
        ];
        let compiled = Rules::compile_with(&by_gid, &files, &Getent::new()).unwrap();
        let found = compiled.rules[0].group.as_ref().unwrap();
        assert_eq!(found.member_uids, g.member_uids);
        let nobody = compiled.rules[1].group.as_ref().unwrap();
        assert!(nobody.member_uids.is_empty(), "{nobody:?}");
    }

    /// Counts what reaches a real name service.
    struct Counting<N> {
        inner: N,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl<N: NameService> NameService for Counting<N> {
        fn getent(&self, db: Database, keys: &[&str]) -> Result<String, NssError> {
            self.asked
                .borrow_mut()
                .push(format!("{db} {}", keys.join(" ")));
            self.inner.getent(db, keys)
        }
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
