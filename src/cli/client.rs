//! The client subcommands: `tm-agent token|sign|stamp|status|pubkey|watch|ping`.
//!
//! Owns the command-line shape of these commands ([`ClientCommand`]) and what they print.
//! They talk to a running agent through [`crate::client::Client`] (blocking; no runtime).
//! Errors go to stderr with a hint of what to do; the exit code says what kind of failure it
//! was (see [`crate::client::exit`] and `proto/PROTOCOL.md`).
//!
//! Which profile: `--profile`, else `$TM_AGENT_PROFILE`, else the only profile the agent
//! shows this user in `status`; with several, the command asks for `--profile`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand, ValueEnum};

use crate::client::{exit, Client, ClientError, WatchEvent};
use crate::protocol::{ErrorCode, ProfileStatus, StatusResult};

/// The environment variable naming the default profile.
pub const PROFILE_ENV: &str = "TM_AGENT_PROFILE";

/// Options every client command takes.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The agent's socket [default: $TM_AGENT_SOCK, else /run/tm-agent/agent.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Seconds to wait for the agent's reply.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

/// The profile to use.
#[derive(Debug, Clone, Args)]
pub struct ProfileArg {
    /// The profile [default: $TM_AGENT_PROFILE, else the only profile you may use]
    #[arg(long, short = 'p', value_name = "NAME")]
    pub profile: Option<String>,
}

/// The client commands, to be flattened into the top-level `tm-agent` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Print a fresh access token (only the token, for `$(tm-agent token)`).
    Token {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(flatten)]
        profile: ProfileArg,
        /// The token must stay valid at least this many seconds (the agent renews if needed).
        #[arg(long, value_name = "SECS")]
        min_ttl: Option<u64>,
        /// Print every field as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a signed body for POST /api-key/token (JSON: key_id, timestamp, signature).
    Sign {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(flatten)]
        profile: ProfileArg,
        /// Unix seconds to sign [default: now, by the Auth API's clock]; must be within ±30 s.
        #[arg(long, value_name = "UNIX_SECS", allow_negative_numbers = true)]
        timestamp: Option<i64>,
    },
    /// Stamp a Turnkey payload (a JSON object) read from stdin, signed exactly as read; print
    /// the stamp.
    Stamp {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(flatten)]
        profile: ProfileArg,
        /// Drop one trailing newline from stdin before signing (for `echo ... |`).
        #[arg(long)]
        strip_newline: bool,
    },
    /// Show the agent's state: keys, tokens, counters.
    Status {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Only this profile.
        #[arg(long, short = 'p', value_name = "NAME")]
        profile: Option<String>,
        /// Print the raw status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the profile's public key.
    Pubkey {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(flatten)]
        profile: ProfileArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = PubkeyFormat::Pem)]
        format: PubkeyFormat,
    },
    /// Print each access token as it rotates (the current one first), until interrupted.
    Watch {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(flatten)]
        profile: ProfileArg,
        /// Print JSON lines with every field.
        #[arg(long)]
        json: bool,
        /// Stop after this many tokens.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Check that the agent answers.
    Ping {
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// `tm-agent pubkey --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PubkeyFormat {
    /// SubjectPublicKeyInfo PEM (what the API Keys page takes).
    Pem,
    /// The public JWK.
    Jwk,
    /// Compressed SEC1 point, hex (Turnkey's publicKey).
    Hex,
    /// Everything, with key_id and thumbprint.
    Json,
}

/// Runs `command` with the process's stdin, stdout and stderr. Returns the exit code.
pub fn run(command: ClientCommand) -> i32 {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    run_with(
        command,
        &mut stdin.lock(),
        &mut stdout.lock(),
        &mut stderr.lock(),
    )
}

/// Runs `command` with the given streams (for tests). Returns the exit code; errors are
/// written to `stderr` as `tm-agent: <message>`.
pub fn run_with(
    command: ClientCommand,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> i32 {
    match execute(command, stdin, stdout) {
        Ok(()) => exit::OK,
        Err(Failure::Client(err)) => {
            let _ = writeln!(stderr, "tm-agent: {err}");
            err.exit_code()
        }
        Err(Failure::Usage(message)) => {
            let _ = writeln!(stderr, "tm-agent: {message}");
            exit::USAGE
        }
        Err(Failure::Output(err)) if err.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(Failure::Output(err)) => {
            let _ = writeln!(stderr, "tm-agent: cannot write output: {err}");
            exit::FAILURE
        }
    }
}

enum Failure {
    Client(ClientError),
    Usage(String),
    Output(std::io::Error),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Output(e)
    }
}

fn connect(args: &ConnectArgs) -> Result<Client, Failure> {
    let path = crate::client::socket_path(args.socket.as_deref());
    let mut client = Client::connect(&path)?;
    client.set_timeout(Some(Duration::from_secs(args.timeout.max(1))))?;
    Ok(client)
}

/// `--profile`, `$TM_AGENT_PROFILE`, or the only profile `status` shows.
fn pick_profile(client: &mut Client, arg: &ProfileArg) -> Result<String, Failure> {
    if let Some(p) = &arg.profile {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var(PROFILE_ENV).ok().filter(|p| !p.is_empty()) {
        return Ok(p);
    }
    let status = match client.status(None) {
        Ok(status) => status,
        // Still a refusal (exit 4), with the way around the lookup; other errors as they are.
        Err(ClientError::Agent {
            code: ErrorCode::Forbidden,
            message,
        }) => {
            return Err(ClientError::Agent {
                code: ErrorCode::Forbidden,
                message: format!(
                    "{message} (asked to find your profile: give --profile NAME or set \
                     ${PROFILE_ENV})"
                ),
            }
            .into())
        }
        Err(e) => return Err(e.into()),
    };
    match status.profiles.as_slice() {
        [only] => Ok(only.name.clone()),
        [] => Err(Failure::Usage(format!(
            "the agent shows you no profile: give --profile NAME or set ${PROFILE_ENV}"
        ))),
        many => Err(Failure::Usage(format!(
            "the agent has several profiles ({}): choose one with --profile or ${PROFILE_ENV}",
            many.iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn json_line(out: &mut dyn Write, value: &impl serde::Serialize) -> Result<(), Failure> {
    serde_json::to_writer(&mut *out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

fn execute(
    command: ClientCommand,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    match command {
        ClientCommand::Ping { connect: c } => {
            connect(&c)?.ping()?;
            writeln!(out, "pong")?;
        }
        ClientCommand::Token {
            connect: c,
            profile,
            min_ttl,
            json,
        } => {
            let mut client = connect(&c)?;
            let profile = pick_profile(&mut client, &profile)?;
            let token = client.token(&profile, min_ttl)?;
            if json {
                json_line(out, &token)?;
            } else {
                writeln!(out, "{}", token.access_token)?;
            }
        }
        ClientCommand::Sign {
            connect: c,
            profile,
            timestamp,
        } => {
            let mut client = connect(&c)?;
            let profile = pick_profile(&mut client, &profile)?;
            json_line(out, &client.sign_challenge(&profile, timestamp)?)?;
        }
        ClientCommand::Stamp {
            connect: c,
            profile,
            strip_newline,
        } => {
            let mut payload = String::new();
            stdin
                .read_to_string(&mut payload)
                .map_err(|e| Failure::Usage(format!("cannot read the payload from stdin: {e}")))?;
            if strip_newline && payload.ends_with('\n') {
                payload.pop();
                if payload.ends_with('\r') {
                    payload.pop();
                }
            }
            if payload.is_empty() {
                return Err(Failure::Usage(
                    "the payload on stdin is empty: pipe the Turnkey payload in".into(),
                ));
            }
            let mut client = connect(&c)?;
            let profile = pick_profile(&mut client, &profile)?;
            writeln!(out, "{}", client.stamp(&profile, &payload)?.stamp)?;
        }
        ClientCommand::Status {
            connect: c,
            profile,
            json,
        } => {
            let status = connect(&c)?.status(profile.as_deref())?;
            if json {
                json_line(out, &status)?;
            } else {
                print_status(out, &status, SystemTime::now())?;
            }
        }
        ClientCommand::Pubkey {
            connect: c,
            profile,
            format,
        } => {
            let mut client = connect(&c)?;
            let profile = pick_profile(&mut client, &profile)?;
            let key = client.public_key(&profile)?;
            match format {
                PubkeyFormat::Pem => write!(out, "{}", key.pem)?,
                PubkeyFormat::Jwk => json_line(out, &key.jwk)?,
                PubkeyFormat::Hex => writeln!(out, "{}", key.hex)?,
                PubkeyFormat::Json => json_line(out, &key)?,
            }
        }
        ClientCommand::Watch {
            connect: c,
            profile,
            json,
            count,
        } => {
            let mut client = connect(&c)?;
            let profile = pick_profile(&mut client, &profile)?;
            let mut seen = 0u64;
            for event in client.watch(&profile)? {
                match event? {
                    WatchEvent::Token(token) => {
                        if json {
                            json_line(out, &token)?;
                        } else {
                            writeln!(out, "{}", token.access_token)?;
                        }
                        out.flush()?;
                        seen += 1;
                        if count.is_some_and(|n| seen >= n) {
                            break;
                        }
                    }
                    WatchEvent::End { reason } => {
                        return Err(Failure::Client(ClientError::Agent {
                            code: crate::protocol::ErrorCode::Unavailable,
                            message: format!("the agent ended the stream ({reason})"),
                        }))
                    }
                }
            }
        }
    }
    Ok(())
}

/// `in 5m12s`, `3s ago`.
fn relative(t: i64, now: i64) -> String {
    let d = t - now;
    let span = human(d.unsigned_abs());
    if d >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

fn human(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

fn print_status(out: &mut dyn Write, s: &StatusResult, now: SystemTime) -> std::io::Result<()> {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    writeln!(
        out,
        "tm-agent {} (protocol v{}), up {}",
        s.version,
        s.protocol,
        human(s.uptime_secs)
    )?;
    if s.profiles.is_empty() {
        writeln!(out, "no profiles visible to you")?;
    }
    for p in &s.profiles {
        print_profile(out, p, now)?;
    }
    let c = &s.counters;
    writeln!(
        out,
        "connections: {} open, {} total, {} turned away",
        c.connections.open, c.connections.total, c.connections.rejected
    )?;
    let nonzero = |m: &std::collections::BTreeMap<String, u64>| {
        let parts: Vec<String> = m
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    };
    writeln!(out, "requests: {}", nonzero(&c.requests))?;
    writeln!(out, "errors: {}", nonzero(&c.errors))?;
    Ok(())
}

fn print_profile(out: &mut dyn Write, p: &ProfileStatus, now: i64) -> std::io::Result<()> {
    let when = |t: Option<i64>| t.map(|t| relative(t, now)).unwrap_or_else(|| "-".into());
    writeln!(out, "profile {}", p.name)?;
    writeln!(out, "  key_id        {}", p.key_id)?;
    writeln!(
        out,
        "  key           {} {} ({})",
        p.backend,
        p.location,
        if p.hardware_backed {
            "hardware-backed"
        } else {
            "SOFTWARE key, not hardware-backed"
        }
    )?;
    match &p.key.error {
        None => writeln!(
            out,
            "  key health    {} ({} signatures, {} errors)",
            p.key.state, p.key.signatures, p.key.errors
        )?,
        Some(e) => writeln!(out, "  key health    {}: {e}", p.key.state)?,
    }
    let t = &p.token;
    writeln!(
        out,
        "  token         {}, expires {}",
        if t.valid { "valid" } else { "NONE VALID" },
        when(t.expires_at)
    )?;
    // A renewal that is due (or the first mint) is being attempted right now.
    let next = match t.next_refresh {
        Some(due) if due <= now => format!("under way (due {})", relative(due, now)),
        None if !t.valid && t.last_error.is_none() => "under way (the first token)".into(),
        other => when(other),
    };
    writeln!(out, "  next refresh  {next}")?;
    if let Some(err) = &t.last_error {
        writeln!(
            out,
            "  last error    {} ({} failures in a row): {err}",
            t.last_error_code.as_deref().unwrap_or("error"),
            t.consecutive_failures
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(relative(100, 40), "in 1m00s");
        assert_eq!(relative(40, 100), "1m00s ago");
        assert_eq!(human(7322), "2h02m");
        assert_eq!(human(90_000), "1d01h");
    }

    #[test]
    fn a_renewal_under_way_says_so() {
        // The status line of a profile whose token is `valid` until `expires` (unix secs),
        // next renewed at `next`, read at 1000.
        let next_refresh_line = |valid: bool, expires: Option<i64>, next: Option<i64>| {
            let token = serde_json::json!({
                "valid": valid, "expires_at": expires, "next_refresh": next,
                "last_mint": null, "last_refresh": null, "consecutive_failures": 0,
                "last_error_code": null, "last_error": null, "clock_offset_secs": 0,
            });
            let p: ProfileStatus = serde_json::from_value(serde_json::json!({
                "name": "prod", "key_id": "k", "backend": "soft", "location": "l",
                "hardware_backed": false,
                "key": {"state": "ok", "error": null, "last_ok": null, "signatures": 1, "errors": 0},
                "token": token,
            }))
            .unwrap();
            let mut out = Vec::new();
            print_profile(&mut out, &p, 1_000).unwrap();
            let text = String::from_utf8(out).unwrap();
            let line = text.lines().find(|l| l.contains("next refresh"));
            line.unwrap_or_else(|| panic!("{text}")).to_owned()
        };
        assert_eq!(
            next_refresh_line(false, None, None),
            "  next refresh  under way (the first token)"
        );
        assert_eq!(
            next_refresh_line(true, Some(1100), Some(990)),
            "  next refresh  under way (due 10s ago)"
        );
        assert_eq!(
            next_refresh_line(true, Some(1100), Some(1060)),
            "  next refresh  in 1m00s"
        );
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: ClientCommand,
    }

    #[test]
    fn commands_parse() {
        use clap::Parser as _;
        let cli =
            Cli::try_parse_from(["tm-agent", "token", "--profile", "prod", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            ClientCommand::Token { json: true, .. }
        ));
        let cli = Cli::try_parse_from(["tm-agent", "sign", "--timestamp", "-5"]).unwrap();
        assert!(matches!(
            cli.command,
            ClientCommand::Sign {
                timestamp: Some(-5),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["tm-agent", "pubkey", "--format", "nope"]).is_err());
    }
}
