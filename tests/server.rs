//! The server end to end over a real Unix socket: every op through the client, access
//! control (including a peer under another uid), hostile and broken clients, timeouts,
//! caps, shutdown, audit records, and the CLI commands as library calls.

mod common;
#[path = "common/sim.rs"]
mod sim_fixture;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime};

use common::agent::{root_rule, test_key, TestAgent, KEY_ID_PREFIX};
use p256::ecdsa::signature::Verifier as _;
use serde_json::{json, Value};
use tm_agent::cli::client::{run_with, ClientCommand, ConnectArgs, ProfileArg, PubkeyFormat};
use tm_agent::client::{exit, ClientError, WatchEvent};
use tm_agent::jose;
use tm_agent::protocol::ErrorCode;
use tm_agent::server::ServerSettings;
use tokio_util::sync::CancellationToken;

/// A raw protocol connection (std, blocking, with a read timeout).
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn connect(agent: &TestAgent) -> Raw {
        let stream = UnixStream::connect(&agent.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "connection closed while a reply was expected");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    /// True if the server ended the stream with a clean EOF within the read timeout (a
    /// close the agent decides on never resets the connection, even with our bytes unread).
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => panic!("the stream did not end with EOF: {e} (after {rest:?})"),
        }
    }

    /// Everything up to the end of the stream, which must be a clean EOF (ECONNRESET
    /// would make `read_to_end` throw away the lines already received).
    fn read_all(&mut self) -> Vec<Value> {
        let mut rest = String::new();
        if let Err(e) = self.reader.read_to_string(&mut rest) {
            panic!("the stream did not end with EOF: {e} (after {rest:?})");
        }
        rest.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect()
    }

    fn call(&mut self, request: Value) -> Value {
        self.send(&format!("{request}\n"));
        self.recv()
    }
}

fn code(reply: &Value) -> &str {
    reply["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn every_op_end_to_end_through_the_blocking_client() {
    let agent = TestAgent::start_default();
    let mut c = agent.client();
    c.ping().unwrap();

    let token = c.token("prod", None).unwrap();
    assert_eq!(
        Some(token.access_token.clone()),
        agent.tokens("prod").current()
    );
    assert_eq!(token.token_type, "Bearer");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((token.expires_at - now - 900).abs() <= 2);
    assert!(token.expires_at_rfc3339.ends_with('Z'));

    // A min_ttl near or beyond a fresh token's whole life (900 s): 90% of it is what a
    // renewal would give at best, and this fresh token has that: answered from memory,
    // without a renewal (the manager renews only for tokens past a tenth of their life).
    for min_ttl in [899, 1000, u64::MAX / 2] {
        let again = c
            .token("prod", Some(min_ttl))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.access_token, token.access_token);
    }
    assert_eq!(
        agent.tokens("prod").current().as_deref(),
        Some(token.access_token.as_str())
    );
    // No token and the API failing: `unavailable` (counted below); then a renewal again.
    agent.tokens("prod").clear();
    agent.tokens("prod").set_failing(true);
    let down = c.token("prod", None).unwrap_err();
    assert_eq!(down.code(), Some(ErrorCode::Unavailable));
    agent.tokens("prod").set_failing(false);
    let renewed = c.token("prod", None).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(renewed.access_token, token.access_token);

    let key = *test_key(0).verifying_key();
    let body = c.sign_challenge("prod", None).unwrap();
    assert_eq!(body.key_id, format!("{KEY_ID_PREFIX}0"));
    assert!((body.timestamp - now).abs() <= 2);
    let sig = jose::decode_es256(&body.signature).unwrap();
    let message = jose::challenge_message(&body.key_id, body.timestamp);
    key.verify(message.as_bytes(), &sig).unwrap();
    let body = c.sign_challenge("prod", Some(now - 20)).unwrap();
    assert_eq!(body.timestamp, now - 20);

    let payload = r#"{"type":"ACTIVITY_TYPE_SIGN_RAW_PAYLOAD_V2","timestampMs":"1"}"#;
    let stamp = c.stamp("prod", payload).unwrap();
    let decoded = jose::decode_turnkey_stamp(&stamp.stamp).unwrap();
    assert_eq!(decoded.public_key, jose::public_key_compressed_hex(&key));
    let der = hex::decode(&decoded.signature).unwrap();
    let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
    key.verify(payload.as_bytes(), &sig).unwrap();

    let pk = c.public_key("prod").unwrap();
    assert_eq!(pk.pem, jose::public_key_pem(&key));
    assert_eq!(pk.hex, jose::public_key_compressed_hex(&key));
    assert_eq!(pk.key_id, format!("{KEY_ID_PREFIX}0"));
    assert_eq!(
        pk.thumbprint,
        jose::Jwk::from_verifying_key(&key).thumbprint()
    );

    let status = c.status(None).unwrap();
    assert_eq!(status.protocol, 1);
    assert_eq!(status.profiles.len(), 1);
    let p = &status.profiles[0];
    assert_eq!((p.name.as_str(), p.backend.as_str()), ("prod", "soft"));
    assert!(!p.hardware_backed);
    assert_eq!(p.key.state, "ok");
    assert!(p.token.valid);
    assert!(status.counters.requests["sign_challenge"] >= 2);
    assert!(status.counters.errors["unavailable"] >= 1);
    assert_eq!(status.counters.connections.open, 1);

    let err = c.token("nope", None).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownProfile));
    assert_eq!(err.exit_code(), exit::AGENT);
}

#[test]
fn async_client_and_watch_rotations() {
    let agent = TestAgent::start_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = tm_agent::client::AsyncClient::connect(&agent.socket)
            .await
            .unwrap();
        c.ping().await.unwrap();
        let first = c.token("prod", None).await.unwrap();
        c.sign_challenge("prod", None).await.unwrap();
        c.public_key("prod").await.unwrap();

        let mut watch = c.watch("prod").await.unwrap();
        match watch.next().await.unwrap().unwrap() {
            WatchEvent::Token(t) => assert_eq!(t.access_token, first.access_token),
            other => panic!("{other:?}"),
        }
        for _ in 0..2 {
            let rotated = agent.tokens("prod").rotate();
            match tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
            {
                WatchEvent::Token(t) => assert_eq!(t.access_token, rotated),
                other => panic!("{other:?}"),
            }
        }
    });
}

#[test]
fn blocking_watch_ends_with_an_end_event_on_shutdown() {
    let agent = TestAgent::start_default();
    let mut watch = agent.client().watch("prod").unwrap();
    assert!(matches!(watch.next(), Some(Ok(WatchEvent::Token(_)))));
    agent.stop().unwrap();
    match watch.next() {
        Some(Ok(WatchEvent::End { reason })) => assert_eq!(reason, "shutdown"),
        other => panic!("{other:?}"),
    }
    assert!(watch.next().is_none());
    assert!(
        !agent.socket.exists(),
        "the socket file is removed at shutdown"
    );
}

/// Sends each of `requests` on one connection as uid and gid 65534, from a child process
/// that dropped root; its stdout has one reply line per request.
fn requests_as_nobody(agent: &TestAgent, requests: &[&str]) -> std::process::Output {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile('rwb')
for req in sys.argv[2:]:
    f.write(req.encode() + b"\n"); f.flush()
    sys.stdout.write(f.readline().decode())
"#;
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(&agent.socket)
        .args(requests)
        .output()
        .unwrap()
}

#[test]
fn a_peer_under_another_uid_gets_forbidden_and_nothing_else() {
    let mut builder = TestAgent::builder();
    builder.dir_mode = 0o755;
    builder.socket_mode = 0o666;
    let agent = builder.start();
    let token = agent.tokens("prod").current().unwrap();
    let requests = [
        r#"{"v":1,"id":1,"op":"token","profile":"prod"}"#,
        r#"{"v":1,"id":2,"op":"sign_challenge","profile":"prod"}"#,
        r#"{"v":1,"id":3,"op":"stamp","profile":"prod","payload":"x"}"#,
        r#"{"v":1,"id":4,"op":"public_key","profile":"prod"}"#,
        r#"{"v":1,"id":5,"op":"status"}"#,
        r#"{"v":1,"id":6,"op":"watch","profile":"prod"}"#,
        r#"{"v":1,"id":7,"op":"token","profile":"no-such-profile"}"#,
    ];
    let output = requests_as_nobody(&agent, &requests);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let replies: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies.len(), requests.len(), "{stdout}");
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply["id"], json!(i + 1));
        assert_eq!(reply["ok"], json!(false));
        // Not even whether a profile exists is told to a peer without access.
        assert_eq!(code(reply), "forbidden", "{reply}");
        assert!(reply.get("result").is_none());
    }
    assert!(!stdout.contains(&token));
    assert!(!stdout.contains(KEY_ID_PREFIX));
    let logs = agent.logs.text();
    assert!(
        logs.lines().any(|l| l.contains("audit")
            && l.contains("uid=65534")
            && l.contains("result=\"forbidden\"")),
        "{logs}"
    );
}

#[test]
fn malformed_unknown_and_wrong_version_requests_are_answered_and_the_connection_lives() {
    let agent = TestAgent::start_default();
    let mut raw = Raw::connect(&agent);
    raw.send("this is not json\n");
    let r = raw.recv();
    assert_eq!((r["id"].clone(), code(&r)), (Value::Null, "bad_request"));

    let r = raw.call(json!({"v":1,"id":5,"op":"fly","profile":"prod"}));
    assert_eq!((r["id"].clone(), code(&r)), (json!(5), "bad_request"));
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown op `fly`"));

    let r = raw.call(json!({"v":2,"id":6,"op":"ping"}));
    assert_eq!(
        (r["id"].clone(), code(&r)),
        (json!(6), "unsupported_version")
    );
    // A JSON array is no request, though serde would read one by position.
    raw.send("[1,17,\"token\",\"prod\"]\n");
    let r = raw.recv();
    assert_eq!(
        (r["id"].clone(), code(&r)),
        (Value::Null, "bad_request"),
        "{r}"
    );
    assert!(r.get("result").is_none(), "{r}");
    // A newer version's request may carry fields v1 does not know: still the version.
    let r = raw.call(json!({"v":2,"id":16,"op":"ping","trace":"x"}));
    assert_eq!(
        (r["id"].clone(), code(&r)),
        (json!(16), "unsupported_version"),
        "{r}"
    );

    let r = raw.call(json!({"v":1,"id":7,"op":"token","profile":"prod","bogus":1}));
    assert_eq!((r["id"].clone(), code(&r)), (json!(7), "bad_request"));

    let r = raw.call(json!({"v":1,"id":8,"op":"token"}));
    assert_eq!(code(&r), "bad_request");

    // \r\n and blank lines are tolerated.
    raw.send("\n\r\n{\"v\":1,\"id\":9,\"op\":\"ping\"}\r\n");
    let r = raw.recv();
    assert_eq!(r, json!({"id":9,"ok":true,"result":{"pong":true}}));
}

/// Client text reaches the log only escaped and cut short: a newline in a field name, an
/// op or a profile cannot start a forged record (under journald, `<0>` would make it an
/// emergency-priority entry of its own), and error messages stay short.
#[test]
fn client_text_cannot_forge_log_lines_or_bloat_replies() {
    let agent = TestAgent::builder()
        .rules(vec![
            root_rule("token", "prod"),
            root_rule("public_key", "*"),
        ])
        .start();
    let mut raw = Raw::connect(&agent);
    let forged = "\n<0>audit: FORGED op=stamp result=ok\n";
    let long = format!("{forged}{}", "z".repeat(60_000));
    let requests = [
        // An unknown field: serde's message quotes its name.
        json!({"v":1,"id":1,"op":"ping", forged: 1}),
        json!({"v":1,"id":2,"op":"ping", long.clone(): 1}),
        json!({"v":1,"id":3,"op": format!("fly{forged}")}),
        json!({"v":1,"id":4,"op": long.clone()}),
        // Refused by the rules (audited with the profile), then unknown (same).
        json!({"v":1,"id":5,"op":"token","profile": format!("p{forged}")}),
        json!({"v":1,"id":6,"op":"token","profile": long.clone()}),
        json!({"v":1,"id":7,"op":"public_key","profile": format!("p{forged}")}),
        json!({"v":1,"id":8,"op":"public_key","profile": long.clone()}),
    ];
    for (n, request) in requests.iter().enumerate() {
        let r = raw.call(request.clone());
        let expected = match n {
            0..=3 => "bad_request",
            4 | 5 => "forbidden",
            _ => "unknown_profile",
        };
        assert_eq!((r["id"].clone(), code(&r)), (json!(n + 1), expected), "{r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.len() < 400, "{n}: {} bytes", message.len());
        assert!(!message.contains('\n'), "{n}: {message}");
        if n % 2 == 0 {
            assert!(message.contains("\\n<0>audit: FORGED"), "{n}: {message}");
        }
    }
    drop(raw);
    std::thread::sleep(Duration::from_millis(100));
    let logs = agent.logs.text();
    assert!(logs.contains("FORGED"), "the refusals were logged:\n{logs}");
    for line in logs.lines() {
        // Every line is a record of its own, starting with its timestamp.
        assert!(
            line.as_bytes().first().is_some_and(u8::is_ascii_digit),
            "a line that is not a record: {line:?}"
        );
        assert!(line.len() < 1500, "a record of {} bytes", line.len());
    }
}

#[test]
fn pipelined_requests_are_answered_by_id() {
    let agent = TestAgent::start_default();
    let mut raw = Raw::connect(&agent);
    let mut batch = String::new();
    for id in 1..=50 {
        let op = if id % 2 == 0 {
            "sign_challenge"
        } else {
            "token"
        };
        batch.push_str(&format!(
            "{{\"v\":1,\"id\":{id},\"op\":\"{op}\",\"profile\":\"prod\"}}\n"
        ));
    }
    batch.push_str("{\"v\":1,\"id\":51,\"op\":\"ping\"}\n");
    raw.send(&batch);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..51 {
        let r = raw.recv();
        assert_eq!(r["ok"], json!(true), "{r}");
        seen.insert(r["id"].as_u64().unwrap());
    }
    assert_eq!(seen, (1..=51).collect());
}

/// 64 KiB of pipelined `status` requests would make ~2 MB of replies: the connection
/// writes whenever 256 KiB is waiting, so its output buffer stays bounded, and every
/// request is still answered, in order.
#[test]
fn a_flood_of_pipelined_requests_is_answered_with_bounded_buffering() {
    let agent = TestAgent::start_default();
    let mut raw = Raw::connect(&agent);
    // A long first line grows the agent's read buffer to 64 KiB, so that each read brings
    // ~2,000 requests.
    let mut flood = format!(
        "{{\"v\":1,\"id\":0,\"op\":\"ping\"{}}}\n",
        " ".repeat(60_000)
    );
    let n = 6_000;
    for id in 1..=n {
        flood.push_str(&format!("{{\"v\":1,\"id\":{id},\"op\":\"status\"}}\n"));
    }
    let mut writer = raw.writer.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(flood.as_bytes()).unwrap());
    for id in 0..=n {
        let r = raw.recv();
        assert_eq!((r["id"].clone(), r["ok"].clone()), (json!(id), json!(true)));
    }
    sender.join().unwrap();
    drop(raw);
    let deadline = Instant::now() + Duration::from_secs(5);
    let peak = loop {
        let logs = agent.logs.text();
        let closed = logs.lines().find(|l| l.contains("connection closed"));
        if let Some(line) = closed {
            let value = line.split("peak_output_bytes=").nth(1).unwrap();
            let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
            break digits.parse::<usize>().unwrap();
        }
        assert!(Instant::now() < deadline, "no close record:\n{logs}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        peak > 64 * 1024,
        "the flood was not buffered at all ({peak} bytes)"
    );
    assert!(
        peak <= 256 * 1024 + 16 * 1024,
        "{peak} bytes of output buffered at once"
    );
}

#[test]
fn an_oversize_line_is_refused_and_closed_while_others_are_served() {
    let agent = TestAgent::start_default();
    let mut big = Raw::connect(&agent);
    let mut other = Raw::connect(&agent);
    let chunk = "x".repeat(16 * 1024);
    for _ in 0..5 {
        big.writer.write_all(chunk.as_bytes()).ok();
    }
    let r = big.recv();
    assert_eq!((r["id"].clone(), code(&r)), (Value::Null, "bad_request"));
    assert!(r["error"]["message"].as_str().unwrap().contains("64 KiB"));
    assert!(big.closed());
    let r = other.call(json!({"v":1,"id":1,"op":"ping"}));
    assert_eq!(r["ok"], json!(true));

    // Exactly 64 KiB is still fine.
    let payload = json!({ "p": "p".repeat(65536 - 80) }).to_string();
    let line = json!({"v":1,"id":2,"op":"stamp","profile":"prod","payload":payload}).to_string();
    assert!(line.len() <= 65536, "{}", line.len());
    let r = other.call(serde_json::from_str(&line).unwrap());
    assert_eq!(r["ok"], json!(true), "{r}");
}

#[test]
fn a_trickling_client_is_cut_off_while_others_are_served() {
    let settings = ServerSettings {
        line_timeout: Duration::from_secs(2),
        ..ServerSettings::default()
    };
    let agent = TestAgent::builder().settings(settings).start();
    let mut slow = Raw::connect(&agent);
    let mut fast = Raw::connect(&agent);
    let started = Instant::now();
    let request = br#"{"v":1,"id":1,"op":"token","profile":"prod"}"#;
    let mut cut = false;
    for byte in request.iter() {
        if slow.writer.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        // Others keep being served meanwhile.
        let r = fast.call(json!({"v":1,"id":2,"op":"ping"}));
        assert_eq!(r["ok"], json!(true));
        std::thread::sleep(Duration::from_millis(250));
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let elapsed = started.elapsed();
    if !cut {
        let r = slow.recv();
        assert_eq!(code(&r), "bad_request", "{r}");
        assert!(r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("incomplete line"));
        assert!(slow.closed());
    }
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let settings = ServerSettings {
        idle_timeout: Duration::from_secs(1),
        ..ServerSettings::default()
    };
    let agent = TestAgent::builder().settings(settings).start();
    let mut idle = Raw::connect(&agent);
    let started = Instant::now();
    assert!(idle.closed());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // A watch stream is not idle.
    let mut watch = agent.client().watch("prod").unwrap();
    assert!(matches!(watch.next(), Some(Ok(WatchEvent::Token(_)))));
    std::thread::sleep(Duration::from_millis(2500));
    let rotated = agent.tokens("prod").rotate();
    match watch.next() {
        Some(Ok(WatchEvent::Token(t))) => assert_eq!(t.access_token, rotated),
        other => panic!("{other:?}"),
    }
}

/// With the idle timeout longer than the line timeout (as by default: 300 s against 10 s),
/// an idle connection is still closed, counted from its last request's reply; and a client
/// that pipelines with every write ending mid-line is never taken for a trickler, since each
/// of its lines completes well within the line timeout.
#[test]
fn idle_timeout_longer_than_the_line_timeout_and_steady_pipelining() {
    let settings = ServerSettings {
        idle_timeout: Duration::from_secs(2),
        line_timeout: Duration::from_millis(500),
        ..ServerSettings::default()
    };
    let agent = TestAgent::builder().settings(settings).start();
    let mut idle = Raw::connect(&agent);
    assert_eq!(
        idle.call(json!({"v":1,"id":1,"op":"ping"}))["ok"],
        json!(true)
    );
    let answered = Instant::now();
    assert!(idle.closed());
    let waited = answered.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(6),
        "{waited:?}"
    );

    // 2.5 s of writes that each end inside a line: the line is finished 20 ms later.
    let mut pipeliner = Raw::connect(&agent);
    let started = Instant::now();
    let mut sent = 0;
    pipeliner.send("{\"v\":1,");
    while started.elapsed() < Duration::from_millis(2500) {
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
        pipeliner.send(&format!("\"id\":{sent},\"op\":\"ping\"}}\n{{\"v\":1,"));
    }
    pipeliner.send("\"id\":0,\"op\":\"ping\"}\n");
    for _ in 0..=sent {
        let reply = pipeliner.recv();
        assert_eq!(reply["ok"], json!(true), "{reply}");
    }
}

#[test]
fn five_hundred_idle_connections_do_not_block_others() {
    let agent = TestAgent::start_default();
    let idle: Vec<UnixStream> = (0..500)
        .map(|_| UnixStream::connect(&agent.socket).unwrap())
        .collect();
    let mut c = agent.client();
    for _ in 0..10 {
        c.token("prod", None).unwrap();
    }
    let status = c.status(None).unwrap();
    assert!(
        status.counters.connections.open >= 400,
        "{:?}",
        status.counters
    );
    drop(idle);
}

#[test]
fn connections_over_the_cap_get_busy_and_are_closed() {
    let settings = ServerSettings {
        max_connections: 2,
        ..ServerSettings::default()
    };
    let agent = TestAgent::builder().settings(settings).start();
    let (a, _b, _) = two_served_then_busy(&agent);
    // The client library reads that connection-level reply as the agent's `busy` (exit 5,
    // "temporary"), not as a reply to some other request.
    let refused = agent.client().ping().unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Busy), "{refused:?}");
    assert_eq!(refused.exit_code(), 5);
    drop(a);
    wait_for_a_free_slot(&agent);
    assert!(agent.state.counters().connections.rejected >= 1);
}

/// Opens two connections that are served, then a third that must read `busy` (null id)
/// and EOF; returns the two clients and that reply.
fn two_served_then_busy(
    agent: &TestAgent,
) -> (tm_agent::client::Client, tm_agent::client::Client, Value) {
    let mut a = agent.client();
    let mut b = agent.client();
    a.ping().unwrap();
    b.ping().unwrap();
    let mut third = Raw::connect(agent);
    let r = third.recv();
    assert_eq!((r["id"].clone(), code(&r)), (Value::Null, "busy"));
    assert!(third.closed());
    (a, b, r)
}

/// A slot frees up once the server sees a close: a new client gets `pong` within 5 s.
fn wait_for_a_free_slot(agent: &TestAgent) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match agent.client().ping() {
            Ok(()) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the slot never came back: {e}"),
        }
    }
}

/// One uid cannot take every slot: over its own limit it gets `busy`, while another uid
/// is still served, and a closed connection gives its slot back.
#[test]
fn one_uid_cannot_take_every_connection_slot() {
    let settings = ServerSettings {
        max_connections: 6,
        max_connections_per_uid: Some(2),
        ..ServerSettings::default()
    };
    let mut builder = TestAgent::builder().settings(settings);
    builder.dir_mode = 0o755;
    builder.socket_mode = 0o666;
    let agent = builder.start();
    let (a, mut b, r) = two_served_then_busy(&agent);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_connections_per_uid"),
        "{r}"
    );
    // Another uid still gets in (and is answered: ping is open to every peer).
    let output = requests_as_nobody(&agent, &[r#"{"v":1,"id":1,"op":"ping"}"#]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(r#""pong":true"#), "{stdout}");
    drop(a);
    wait_for_a_free_slot(&agent);
    b.ping().unwrap();
    assert!(agent.state.counters().connections.rejected >= 1);
}

#[test]
fn in_flight_requests_per_connection_are_capped() {
    let settings = ServerSettings {
        max_in_flight: 1,
        ..ServerSettings::default()
    };
    let agent = TestAgent::builder().settings(settings).start();
    let mut raw = Raw::connect(&agent);
    // A watch holds the one slot; a sign must wait for a slot: it is refused as busy.
    raw.send("{\"v\":1,\"id\":1,\"op\":\"watch\",\"profile\":\"prod\"}\n");
    assert_eq!(raw.recv()["event"], json!("token"));
    let r = raw.call(json!({"v":1,"id":2,"op":"sign_challenge","profile":"prod"}));
    assert_eq!((r["id"].clone(), code(&r)), (json!(2), "busy"));
    // Inline ops are not limited.
    let r = raw.call(json!({"v":1,"id":3,"op":"token","profile":"prod"}));
    assert_eq!(r["ok"], json!(true));
}

#[test]
fn clients_vanishing_mid_request_do_not_disturb_others() {
    let agent = TestAgent::start_default();
    for _ in 0..20 {
        let mut raw = Raw::connect(&agent);
        let mut batch = String::new();
        for id in 0..20 {
            batch.push_str(&format!(
                "{{\"v\":1,\"id\":{id},\"op\":\"sign_challenge\",\"profile\":\"prod\"}}\n"
            ));
        }
        raw.send(&batch);
        raw.send("{\"v\":1,\"id\":99,\"op\":\"tok");
        drop(raw);
    }
    let mut c = agent.client();
    c.ping().unwrap();
    c.token("prod", None).unwrap();
    // Their abandoned signatures may still fill the signer queue for a moment (`busy` is
    // the honest answer then); the agent must recover quickly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut signed = 0;
    while signed < 5 {
        match c.sign_challenge("prod", None) {
            Ok(_) => signed += 1,
            Err(e) if e.code() == Some(ErrorCode::Busy) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.status(None).unwrap().counters.connections.open > 1 {
        assert!(
            Instant::now() < deadline,
            "vanished connections were not cleaned up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vanished_client_s_pending_signatures_are_dropped_but_a_half_closed_one_is_answered() {
    let mut builder = TestAgent::builder();
    builder.sign_delay = Duration::from_millis(100);
    let agent = builder.start();
    let batch: String = (0..10)
        .map(|id| {
            format!("{{\"v\":1,\"id\":{id},\"op\":\"sign_challenge\",\"profile\":\"prod\"}}\n")
        })
        .collect();
    let signer = agent.state.profiles().next().unwrap().signer.clone();

    // Half-close: the client shuts its write side and still reads every reply.
    let mut half = Raw::connect(&agent);
    half.send(&batch);
    half.writer.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    half.reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest.lines().count(), 10, "{rest}");
    assert!(rest.lines().all(|l| l.contains("\"ok\":true")));
    let before = signer.health().signatures;
    assert_eq!(before, 10);

    // Gone for good: at most the jobs already on the two workers are signed.
    let mut gone = Raw::connect(&agent);
    gone.send(&batch);
    std::thread::sleep(Duration::from_millis(30));
    drop(gone);
    std::thread::sleep(Duration::from_millis(1500));
    let signed = signer.health().signatures - before;
    assert!(
        signed <= 4,
        "{signed} signatures made for a vanished client"
    );
    assert!(agent.logs.text().contains("result=\"cancelled\""));
}

#[test]
fn sign_challenge_refuses_stale_timestamps_and_other_key_ids() {
    let agent = TestAgent::start_default();
    let mut c = agent.client();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for ts in [now - 31, now + 31, 0, i64::MIN, i64::MAX] {
        let err = c.sign_challenge("prod", Some(ts)).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{ts}: {err}");
        assert!(err.to_string().contains("±30 s"), "{err}");
    }
    let mut raw = Raw::connect(&agent);
    let r = raw
        .call(json!({"v":1,"id":1,"op":"sign_challenge","profile":"prod","key_id":"someone-else"}));
    assert_eq!(code(&r), "forbidden", "{r}");
    let own = format!("{KEY_ID_PREFIX}0");
    let r = raw.call(json!({"v":1,"id":2,"op":"sign_challenge","profile":"prod","key_id":own}));
    assert_eq!(r["ok"], json!(true), "{r}");
}

/// `stamp` is not a general signing oracle either: it signs JSON objects (Turnkey activity
/// payloads) only, so it cannot make a challenge signature for a time of the client's
/// choosing (a token-minting credential that would outlive a revocation).
#[test]
fn stamp_refuses_anything_but_a_json_object() {
    let agent = TestAgent::start_default();
    let signer = agent.state.profiles().next().unwrap().signer.clone();
    let mut c = agent.client();
    let future = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 86_400;
    let challenge = format!("{KEY_ID_PREFIX}0.{future}");
    for payload in [
        challenge.as_str(),
        "x",
        "",
        "[{}]",
        "\"{}\"",
        "{\"a\":1} trailing",
        "{",
    ] {
        let err = c.stamp("prod", payload).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{payload:?}: {err}");
        assert!(err.to_string().contains("JSON object"), "{err}");
    }
    assert_eq!(signer.health().signatures, 0, "nothing was signed");
    let stamp = c.stamp("prod", r#"{"type":"ACTIVITY_TYPE_X"}"#).unwrap();
    assert!(jose::decode_turnkey_stamp(&stamp.stamp).is_ok());
    let logs = agent.logs.text();
    assert!(
        logs.lines()
            .any(|l| l.contains("op=\"stamp\"") && l.contains("result=\"forbidden\"")),
        "{logs}"
    );
}

#[test]
fn access_rules_per_op_and_profile_and_reload() {
    let agent = TestAgent::builder()
        .profiles(&["prod", "uat"])
        .rules(vec![root_rule("token,status", "uat")])
        .start();
    let mut c = agent.client();
    c.token("uat", None).unwrap();
    let err = c.token("prod", None).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    assert_eq!(err.exit_code(), exit::FORBIDDEN);
    assert!(err.to_string().contains("[[access]]"), "{err}");
    let err = c.sign_challenge("uat", None).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    // status shows only the profiles the peer may see.
    let status = c.status(None).unwrap();
    assert_eq!(
        status
            .profiles
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["uat"]
    );

    // "*" includes neither sign_challenge nor stamp; they must be named.
    agent
        .state
        .reload_rules(tm_agent::authz::Rules::compile(&[root_rule("*", "*")]).unwrap());
    c.token("prod", None).unwrap();
    assert_eq!(
        c.sign_challenge("prod", None).unwrap_err().code(),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        c.stamp("prod", "{}").unwrap_err().code(),
        Some(ErrorCode::Forbidden)
    );
    agent.state.reload_rules(
        tm_agent::authz::Rules::compile(&[root_rule("*", "*"), root_rule("sign_challenge", "*")])
            .unwrap(),
    );
    c.sign_challenge("prod", None).unwrap();
    agent
        .state
        .reload_rules(tm_agent::authz::Rules::compile(&[root_rule("stamp", "prod")]).unwrap());
    c.stamp("prod", "{}").unwrap();
    assert_eq!(
        c.token("prod", None).unwrap_err().code(),
        Some(ErrorCode::Forbidden)
    );
    // ping is open to any peer that can connect.
    agent.state.reload_rules(tm_agent::authz::Rules::deny_all());
    c.ping().unwrap();
}

#[test]
fn a_reload_that_withdraws_watch_ends_running_streams() {
    let agent = TestAgent::builder()
        .profiles(&["prod", "uat"])
        .rules(vec![root_rule("watch", "*")])
        .start();
    let reload = |rules: &[tm_agent::authz::AccessRule]| {
        agent
            .state
            .reload_rules(tm_agent::authz::Rules::compile(rules).unwrap())
    };
    let mut prod = Raw::connect(&agent);
    prod.send("{\"v\":1,\"id\":1,\"op\":\"watch\",\"profile\":\"prod\"}\n");
    assert_eq!(prod.recv()["event"], json!("token"));
    let mut uat = Raw::connect(&agent);
    uat.send("{\"v\":1,\"id\":1,\"op\":\"watch\",\"profile\":\"uat\"}\n");
    assert_eq!(uat.recv()["event"], json!("token"));

    // A reload that keeps the access changes nothing.
    reload(&[root_rule("watch,token", "*")]);
    let rotated = agent.tokens("prod").rotate();
    let r = prod.recv();
    assert_eq!(r["result"]["access_token"], json!(rotated), "{r}");

    // Withdrawn on prod: the stream ends with forbidden, and the next token never comes.
    reload(&[root_rule("watch", "uat")]);
    let rotated = agent.tokens("prod").rotate();
    let r = prod.recv();
    assert_eq!((r["id"].clone(), code(&r)), (json!(1), "forbidden"), "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("rules were reloaded"));
    prod.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut more = String::new();
    let after = prod.reader.read_line(&mut more);
    assert!(after.is_err() && more.is_empty(), "{after:?} {more}");
    assert!(!more.contains(&rotated));
    // The connection itself stays usable.
    prod.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        prod.call(json!({"v":1,"id":2,"op":"ping"}))["ok"],
        json!(true)
    );

    // The uat stream is still allowed and goes on.
    let rotated = agent.tokens("uat").rotate();
    let r = uat.recv();
    assert_eq!(r["result"]["access_token"], json!(rotated), "{r}");

    // Withdrawn without any rotation: the stream ends at once.
    agent.state.reload_rules(tm_agent::authz::Rules::deny_all());
    let r = uat.recv();
    assert_eq!(code(&r), "forbidden", "{r}");
    let logs = agent.logs.text();
    assert!(
        logs.lines()
            .any(|l| l.contains("op=\"watch\"") && l.contains("result=\"forbidden\"")),
        "{logs}"
    );
}

#[test]
fn token_unavailable_and_renewal_failures_map_to_codes() {
    let agent = TestAgent::start_default();
    let fake = agent.tokens("prod");
    fake.clear();
    fake.set_failing(true);
    let mut c = agent.client();
    let err = c.token("prod", None).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable));
    assert_eq!(err.exit_code(), exit::TEMPORARY);
    assert!(
        !err.to_string().contains("503"),
        "details stay in the log: {err}"
    );
    assert!(agent.logs.text().contains("503"));
    fake.set_failing(false);
    let t = c.token("prod", None).unwrap();
    assert_eq!(Some(t.access_token), fake.current());
}

#[test]
fn shutdown_with_clients_connected_returns_cleanly() {
    let agent = TestAgent::start_default();
    let _idle = Raw::connect(&agent);
    let mut partial = Raw::connect(&agent);
    partial.send("{\"v\":1,");
    let mut busy = Raw::connect(&agent);
    let mut batch = String::new();
    for id in 0..30 {
        batch.push_str(&format!(
            "{{\"v\":1,\"id\":{id},\"op\":\"sign_challenge\",\"profile\":\"prod\"}}\n"
        ));
    }
    busy.send(&batch);
    let mut watch = Raw::connect(&agent);
    watch.send("{\"v\":1,\"id\":1,\"op\":\"watch\",\"profile\":\"prod\"}\n");
    assert_eq!(watch.recv()["event"], json!("token"));

    let started = Instant::now();
    agent.stop().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    // In-flight requests were answered before the connection closed, and the stream ends
    // with EOF (not ECONNRESET), so reading it all at once loses nothing.
    let mut answered = 0;
    let mut rest = String::new();
    busy.reader.read_to_string(&mut rest).unwrap();
    for line in rest.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["ok"], json!(true), "{line}");
        answered += 1;
    }
    assert!(answered > 0);
    let end = watch.recv();
    assert_eq!(
        end,
        json!({"id":1,"ok":true,"event":"end","result":{"reason":"shutdown"}})
    );
    assert!(watch.closed());
    assert!(UnixStream::connect(&agent.socket).is_err());
}

/// Requests sent after the agent stopped reading (shutdown) are still unread when it closes:
/// the client nevertheless reads every answer it was promised, then a clean EOF.
#[test]
fn shutdown_with_unread_requests_ends_with_eof_after_every_promised_answer() {
    let mut builder = TestAgent::builder();
    builder.sign_delay = Duration::from_millis(100);
    let agent = builder.start();
    let mut raw = Raw::connect(&agent);
    let first: String = (0..10)
        .map(|id| {
            format!("{{\"v\":1,\"id\":{id},\"op\":\"sign_challenge\",\"profile\":\"prod\"}}\n")
        })
        .collect();
    raw.send(&first);
    // The batch is in flight (two signer workers, 100 ms a signature: ~500 ms).
    std::thread::sleep(Duration::from_millis(50));
    std::thread::scope(|s| {
        let stopping = s.spawn(|| agent.stop());
        std::thread::sleep(Duration::from_millis(50));
        // The agent has stopped reading: these stay in its receive buffer.
        let later: String = (100..400)
            .map(|id| format!("{{\"v\":1,\"id\":{id},\"op\":\"ping\"}}\n"))
            .collect();
        raw.send(&later);
        let replies = raw.read_all();
        let ids: std::collections::BTreeSet<u64> =
            replies.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        // Every request read before the shutdown is answered (on a slow machine the agent
        // may still have read some of the pings; those are answered too).
        assert!((0..10).all(|id| ids.contains(&id)), "{replies:?}");
        assert!(
            replies.iter().all(|r| r["ok"] == json!(true)),
            "{replies:?}"
        );
        let started = Instant::now();
        stopping.join().unwrap().unwrap();
        // The agent lingers at most a moment for a client that keeps its end open.
        assert!(started.elapsed() < Duration::from_secs(2));
    });
}

/// After an oversize line the framing is lost: the agent answers `bad_request` and closes,
/// with the rest of the client's data unread. The client still reads that answer and EOF.
#[test]
fn an_oversize_line_followed_by_more_data_ends_with_the_answer_and_eof() {
    let agent = TestAgent::start_default();
    for _ in 0..5 {
        let mut raw = Raw::connect(&agent);
        let mut data = format!(
            "{{\"v\":1,\"id\":1,\"op\":\"ping\",\"x\":\"{}\"}}\n",
            "x".repeat(70_000)
        );
        for id in 2..500 {
            data.push_str(&format!("{{\"v\":1,\"id\":{id},\"op\":\"ping\"}}\n"));
        }
        raw.send(&data);
        let replies = raw.read_all();
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(
            (replies[0]["id"].clone(), code(&replies[0])),
            (Value::Null, "bad_request")
        );
    }
    // Others are served meanwhile.
    agent.client().ping().unwrap();
}

/// A connection over the cap that sends its request at once still reads `busy` and EOF.
#[test]
fn connections_over_the_cap_read_busy_then_eof_even_with_a_request_sent() {
    let settings = ServerSettings {
        max_connections: 1,
        ..ServerSettings::default()
    };
    let agent = TestAgent::builder().settings(settings).start();
    let mut a = agent.client();
    a.ping().unwrap();
    for _ in 0..20 {
        let mut over = Raw::connect(&agent);
        over.send("{\"v\":1,\"id\":1,\"op\":\"ping\"}\n");
        let replies = over.read_all();
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(
            (replies[0]["id"].clone(), code(&replies[0])),
            (Value::Null, "busy")
        );
    }
    a.ping().unwrap();
}

#[test]
fn audit_log_has_the_records_and_no_secrets() {
    let agent = TestAgent::builder()
        .profiles(&["prod", "uat"])
        .rules(vec![
            root_rule("*", "prod"),
            root_rule("sign_challenge,stamp", "prod"),
        ])
        .start();
    let mut c = agent.client();
    let token = c.token("prod", None).unwrap().access_token;
    c.token("prod", None).unwrap();
    let body = c.sign_challenge("prod", None).unwrap();
    let payload = r#"{"note":"turnkey-payload-SECRET-CONTENT"}"#;
    let stamp = c.stamp("prod", payload).unwrap().stamp;
    c.token("uat", None).unwrap_err();
    // A malformed line is logged without echoing it.
    let mut raw = Raw::connect(&agent);
    raw.send("garbage-SECRET-LINE\n");
    raw.recv();
    // A watch stream hands out tokens too: its first one is on record.
    let mut watch = agent.client().watch("prod").unwrap();
    assert!(matches!(watch.next(), Some(Ok(WatchEvent::Token(_)))));
    drop(watch);
    drop(c);
    drop(raw);
    std::thread::sleep(Duration::from_millis(100));

    let logs = agent.logs.text();
    let audit: Vec<&str> = logs.lines().filter(|l| l.contains(" audit:")).collect();
    let has = |op: &str, result: &str| {
        audit.iter().any(|l| {
            l.contains(&format!("op=\"{op}\"")) && l.contains(&format!("result=\"{result}\""))
        })
    };
    assert!(has("token", "ok"), "{logs}");
    assert!(has("sign_challenge", "ok"), "{logs}");
    assert!(has("stamp", "ok"), "{logs}");
    // What was signed is on record, without the credential or the payload.
    let digest = hex::encode(jose::sha256(payload.as_bytes()));
    assert!(
        audit
            .iter()
            .any(|l| l.contains("op=\"stamp\"")
                && l.contains(&format!("payload_sha256=\"{digest}\""))),
        "{logs}"
    );
    assert!(
        audit.iter().any(|l| l.contains("op=\"sign_challenge\"")
            && l.contains(&format!("timestamp={}", body.timestamp))),
        "{logs}"
    );
    assert!(has("token", "forbidden"), "{logs}");
    assert!(has("watch", "ok"), "{logs}");
    // Only the first token on a connection is audited.
    let tokens_ok = audit
        .iter()
        .filter(|l| l.contains("op=\"token\"") && l.contains("result=\"ok\""))
        .count();
    assert_eq!(tokens_ok, 1, "{logs}");
    assert!(
        audit
            .iter()
            .all(|l| l.contains("uid=0") && l.contains("gid=0") && l.contains("pid=")),
        "{logs}"
    );
    assert!(audit.iter().any(|l| l.contains("exe=")));
    for secret in [
        token.as_str(),
        body.signature.as_str(),
        stamp.as_str(),
        payload,
        "SECRET",
    ] {
        assert!(
            !logs.contains(secret),
            "secret {secret:?} in the logs:\n{logs}"
        );
    }
}

/// Sends `per` pipelined `token` requests for `profile` on each of `connections` new
/// connections, checks that each is answered with error `expect`; returns the seconds taken.
fn token_batches(
    agent: &TestAgent,
    profile: &str,
    connections: usize,
    per: usize,
    expect: &str,
) -> f64 {
    let started = Instant::now();
    for _ in 0..connections {
        let mut raw = Raw::connect(agent);
        let batch: String = (0..per)
            .map(|id| {
                format!("{{\"v\":1,\"id\":{id},\"op\":\"token\",\"profile\":\"{profile}\"}}\n")
            })
            .collect();
        raw.send(&batch);
        for _ in 0..per {
            assert_eq!(code(&raw.recv()), expect);
        }
    }
    started.elapsed().as_secs_f64()
}

/// A connection's first token of each profile is on record even when its first `token`
/// request failed; failed `token` requests share the refusals' budget, so an outage that
/// fails every waiting request at once cannot flood the log.
#[test]
fn first_token_per_profile_is_audited_after_a_failure_and_failures_have_a_budget() {
    let agent = TestAgent::builder()
        .profiles(&["prod", "uat"])
        .rules(vec![root_rule("*", "*")])
        .start();
    agent.tokens("prod").clear();
    agent.tokens("prod").set_failing(true);
    let mut c = agent.client();
    let err = c.token("prod", None).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    agent.tokens("prod").set_failing(false);
    c.token("prod", None).unwrap();
    c.token("prod", None).unwrap();
    c.token("uat", None).unwrap();
    c.token("uat", None).unwrap();
    drop(c);

    // 300 failing requests on 10 connections.
    agent.tokens("uat").clear();
    agent.tokens("uat").set_failing(true);
    let elapsed = token_batches(&agent, "uat", 10, 30, "unavailable");
    std::thread::sleep(Duration::from_millis(100));

    let logs = agent.logs.text();
    let count = |profile: &str, result: &str| {
        logs.lines()
            .filter(|l| {
                l.contains(" audit:")
                    && l.contains("op=\"token\"")
                    && l.contains(&format!("profile=\"{profile}\""))
                    && l.contains(&format!("result=\"{result}\""))
            })
            .count()
    };
    assert_eq!(count("prod", "unavailable"), 1, "{logs}");
    assert_eq!(count("prod", "ok"), 1, "{logs}");
    assert_eq!(count("uat", "ok"), 1, "{logs}");
    let failed = count("uat", "unavailable");
    let budget = 100 + (elapsed * 10.0).ceil() as usize + 1;
    assert!(
        (90..=budget).contains(&failed),
        "{failed} of 300 failed requests audited in {elapsed:.2} s"
    );
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("token request failed") && !l.contains("DEBUG")),
        "no per-request warning beside the record: {logs}"
    );
}

/// Refusal records have one agent-wide budget (100 at once, 10 a second): reconnecting
/// does not buy a client a fresh allowance, and what was left out is counted.
#[test]
fn refusal_audit_records_have_a_global_budget() {
    let agent = TestAgent::builder()
        .rules(vec![root_rule("status", "*")])
        .start();
    let elapsed = token_batches(&agent, "prod", 30, 10, "forbidden");
    let refusals = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains(" audit:") && l.contains("result=\"forbidden\""))
            .count()
    };
    let logged = refusals(&agent.logs.text());
    let budget = 100 + (elapsed * 10.0).ceil() as usize + 1;
    assert!(
        (100..=budget).contains(&logged),
        "{logged} of 300 refusals logged in {elapsed:.2} s"
    );
    // Once the budget refills, the next record comes with the count of those left out.
    std::thread::sleep(Duration::from_millis(250));
    let mut raw = Raw::connect(&agent);
    assert_eq!(
        code(&raw.call(json!({"v":1,"id":1,"op":"token","profile":"prod"}))),
        "forbidden"
    );
    let logs = agent.logs.text();
    assert_eq!(refusals(&logs), logged + 1, "{logs}");
    let summary = logs
        .lines()
        .find(|l| l.contains("left out of the audit log"))
        .unwrap_or_else(|| panic!("no summary:\n{logs}"));
    assert!(
        summary.contains(&format!("suppressed={}", 300 - logged)),
        "{summary}"
    );
}

fn connect_args(agent: &TestAgent) -> ConnectArgs {
    ConnectArgs {
        socket: Some(agent.socket.clone()),
        timeout: 10,
    }
}

fn prod() -> ProfileArg {
    ProfileArg {
        profile: Some("prod".into()),
    }
}

fn cli(command: ClientCommand, stdin: &str) -> (i32, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = run_with(command, &mut stdin.as_bytes(), &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn cli_commands_print_what_they_promise() {
    let agent = TestAgent::builder().profiles(&["prod", "uat"]).start();
    let token = agent.tokens("prod").current().unwrap();

    let (code, out, _) = cli(
        ClientCommand::Token {
            connect: connect_args(&agent),
            profile: prod(),
            min_ttl: None,
            json: false,
        },
        "",
    );
    assert_eq!((code, out), (0, format!("{token}\n")));

    let (code, out, _) = cli(
        ClientCommand::Token {
            connect: connect_args(&agent),
            profile: prod(),
            min_ttl: Some(60),
            json: true,
        },
        "",
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["access_token"], json!(token));
    assert_eq!(v["token_type"], json!("Bearer"));

    let (code, out, _) = cli(
        ClientCommand::Sign {
            connect: connect_args(&agent),
            profile: prod(),
            timestamp: None,
        },
        "",
    );
    assert_eq!(code, 0);
    let body: jose::ChallengeBody = serde_json::from_str(&out).unwrap();
    assert_eq!(body.key_id, format!("{KEY_ID_PREFIX}0"));

    let (code, out, _) = cli(
        ClientCommand::Stamp {
            connect: connect_args(&agent),
            profile: prod(),
            strip_newline: true,
        },
        "{\"type\":\"ACTIVITY\"}\n",
    );
    assert_eq!(code, 0);
    let stamp = jose::decode_turnkey_stamp(out.trim()).unwrap();
    let sig = p256::ecdsa::Signature::from_der(&hex::decode(stamp.signature).unwrap()).unwrap();
    test_key(0)
        .verifying_key()
        .verify(br#"{"type":"ACTIVITY"}"#, &sig)
        .unwrap();

    let (code, out, _) = cli(
        ClientCommand::Pubkey {
            connect: connect_args(&agent),
            profile: prod(),
            format: PubkeyFormat::Pem,
        },
        "",
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("-----BEGIN PUBLIC KEY-----"));

    let (code, out, _) = cli(
        ClientCommand::Status {
            connect: connect_args(&agent),
            profile: None,
            json: false,
        },
        "",
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("profile prod") && out.contains("profile uat"),
        "{out}"
    );
    assert!(out.contains("SOFTWARE key"), "{out}");
    let (code, out, _) = cli(
        ClientCommand::Status {
            connect: connect_args(&agent),
            profile: Some("uat".into()),
            json: true,
        },
        "",
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["profiles"].as_array().unwrap().len(), 1);

    let (code, out, _) = cli(
        ClientCommand::Ping {
            connect: connect_args(&agent),
        },
        "",
    );
    assert_eq!((code, out.as_str()), (0, "pong\n"));

    let rotated = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            cli(
                ClientCommand::Watch {
                    connect: connect_args(&agent),
                    profile: prod(),
                    json: false,
                    count: Some(2),
                },
                "",
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let rotated = agent.tokens("prod").rotate();
        let (code, out, err) = watcher.join().unwrap();
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, format!("{token}\n{rotated}\n"));
        rotated
    });
    assert_ne!(rotated, token);
}

#[test]
fn cli_errors_say_what_to_do_and_use_the_documented_exit_codes() {
    let agent = TestAgent::builder()
        .profiles(&["prod", "uat"])
        .rules(vec![root_rule("token", "uat")])
        .start();
    let (code, _, err) = cli(
        ClientCommand::Ping {
            connect: ConnectArgs {
                socket: Some(agent.dir.path().join("missing.sock")),
                timeout: 5,
            },
        },
        "",
    );
    assert_eq!(code, exit::CONNECT);
    assert!(err.contains("is tm-agent running?"), "{err}");

    let token = |profile: Option<&str>| {
        cli(
            ClientCommand::Token {
                connect: connect_args(&agent),
                profile: ProfileArg {
                    profile: profile.map(Into::into),
                },
                min_ttl: None,
                json: false,
            },
            "",
        )
    };
    let (code, _, err) = token(Some("prod"));
    assert_eq!(code, exit::FORBIDDEN);
    assert!(
        err.contains("permission denied by the agent") && err.contains("[[access]]"),
        "{err}"
    );
    let (code, out, _) = token(Some("uat"));
    assert_eq!(code, 0);
    assert!(out.starts_with("eyJ"));
    // Without --profile the CLI needs `status` to find the only profile; it is not allowed:
    // a refusal (4), which says how to do without the lookup.
    let (code, _, err) = token(None);
    assert_eq!(code, exit::FORBIDDEN, "{err}");
    assert!(
        err.contains("permission denied by the agent") && err.contains("--profile"),
        "{err}"
    );
    let _ = ClientError::Timeout(Duration::from_secs(1));
}

#[test]
fn cli_picks_the_only_profile() {
    let agent = TestAgent::start_default();
    let (code, out, err) = cli(
        ClientCommand::Token {
            connect: connect_args(&agent),
            profile: ProfileArg { profile: None },
            min_ttl: None,
            json: false,
        },
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(Some(out.trim().to_owned()), agent.tokens("prod").current());
}

#[test]
fn bench_runs_against_the_agent_and_the_echo_baseline() {
    let agent = TestAgent::start_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for op in [
        tm_agent::cli::bench::BenchOp::Token,
        tm_agent::cli::bench::BenchOp::Ping,
        tm_agent::cli::bench::BenchOp::SignChallenge,
    ] {
        let args = tm_agent::cli::bench::BenchArgs {
            socket: Some(agent.socket.clone()),
            profile: Some("prod".into()),
            op,
            connections: 4,
            duration: 1,
            warmup: 0,
            pipeline: 2,
            no_baseline: op != tm_agent::cli::bench::BenchOp::Token,
            threads: 1,
            json: false,
            busy_poll: false,
        };
        let report = rt.block_on(tm_agent::cli::bench::bench(&args)).unwrap();
        assert!(report.agent.requests > 10, "{report:?}");
        assert_eq!(report.agent.errors, 0, "{report:?}");
        if op == tm_agent::cli::bench::BenchOp::Token {
            let baseline = report.baseline.as_ref().unwrap();
            assert!(baseline.requests > 10);
            let mut out = Vec::new();
            tm_agent::cli::bench::print_report(&mut out, &report, &args).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("echo baseline") && text.contains("agent/echo"),
                "{text}"
            );
        }
    }
}

/// `--busy-poll`: one spinning client against the agent, and against a spinning echo; every
/// reply checked. More than one connection is refused before anything is sent.
#[test]
fn bench_busy_poll_against_the_agent_and_a_spinning_echo() {
    use tm_agent::cli::bench::{bench, BenchArgs, BenchOp};
    let agent = TestAgent::start_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let args = BenchArgs {
        socket: Some(agent.socket.clone()),
        profile: Some("prod".into()),
        op: BenchOp::SignChallenge,
        connections: 1,
        duration: 1,
        warmup: 0,
        threads: 1,
        busy_poll: true,
        ..BenchArgs::default()
    };
    let report = rt.block_on(bench(&args)).unwrap();
    assert!(report.busy_poll);
    assert!(report.agent.requests > 10, "{report:?}");
    assert_eq!(report.agent.errors, 0, "{report:?}");
    let baseline = report.baseline.as_ref().unwrap();
    assert!(baseline.requests > 10, "{report:?}");
    let logs = agent.logs.text();
    let signed = logs
        .lines()
        .filter(|l| l.contains(" audit:") && l.contains("op=\"sign_challenge\""))
        .count();
    assert!(signed as u64 >= report.agent.requests, "{signed} audited");

    let mut out = Vec::new();
    tm_agent::cli::bench::print_report(&mut out, &report, &args).unwrap();
    assert!(String::from_utf8(out).unwrap().contains("busy-poll"));

    let two = BenchArgs {
        connections: 2,
        ..args.clone()
    };
    let err = rt.block_on(bench(&two)).unwrap_err().to_string();
    assert!(err.contains("-c 1"), "{err}");
}

/// The whole path with the real token manager: agent → `token::Manager` → `auth_api` →
/// the Auth API simulator (3 s tokens), in real time.
#[test]
fn real_manager_and_simulator_token_watch_and_sign() {
    use tm_agent::auth_api::{self, ApiSettings};
    use tm_agent::sim::{SimConfig, DEFAULT_ISSUER};
    use tm_agent::token::{Manager, TokenSettings};

    let sim = sim_fixture::BackgroundSim::start(SimConfig {
        access_ttl: Duration::from_secs(3),
        ..SimConfig::default()
    });
    let key = sim_fixture::TestKey::random();
    sim.handle.register_key(key.registration()).unwrap();
    let api = ApiSettings::custom(format!("{}/v1/auth", sim.handle.http_url()));
    let token_settings = TokenSettings {
        issuer: Some(DEFAULT_ISSUER.to_string()),
        renew_timeout: Duration::from_secs(5),
        ..TokenSettings::new(key.key_id.clone())
    };
    let cancel = CancellationToken::new();
    let mut builder = TestAgent::builder().profiles(&[]);
    {
        let api = api.clone();
        let cancel = cancel.clone();
        builder.custom.push(common::agent::CustomProfile {
            name: "live".into(),
            key: key.signing_key.clone(),
            key_id: key.key_id.clone(),
            tokens: Box::new(move |signer| {
                let client = auth_api::Client::new(&api).unwrap();
                std::sync::Arc::new(Manager::start(token_settings, signer, client, cancel))
            }),
        });
    }
    let agent = builder.start();
    let mut c = agent.client();
    // The first mint happens at start; the first request may wait for it.
    let first = c.token("live", None).unwrap();
    assert_eq!(first.access_token.split('.').count(), 3, "a JWT");
    assert_eq!(
        c.token("live", None).unwrap().access_token,
        first.access_token
    );

    // Rotations arrive on a watch stream (refresh at ~2/3 of 3 s).
    let mut watch = agent.client().watch("live").unwrap();
    let mut seen = vec![];
    let started = Instant::now();
    while seen.len() < 3 {
        match watch.next() {
            Some(Ok(WatchEvent::Token(t))) => {
                if seen.last() != Some(&t.access_token) {
                    seen.push(t.access_token);
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no rotation");
    }
    assert_ne!(seen[1], seen[2]);

    // The agent's signed challenge is accepted by the simulator's independent verifier.
    let body = c.sign_challenge("live", None).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pair = rt
        .block_on(async {
            let client = auth_api::Client::new(&api).unwrap();
            client
                .mint(&jose::ChallengeBody {
                    key_id: body.key_id.clone(),
                    timestamp: body.timestamp,
                    signature: body.signature.clone(),
                })
                .await
        })
        .unwrap();
    assert!(!pair.access_token.is_empty());

    let status = c.status(Some("live")).unwrap();
    let p = &status.profiles[0];
    assert!(p.token.valid, "{p:?}");
    assert!(
        p.token.expires_at.is_some() && p.token.next_refresh.is_some(),
        "{p:?}"
    );
    // A min_ttl above the lifetime still gets a token (no renewal could do better).
    c.token("live", Some(60)).unwrap();
    cancel.cancel();
}

/// A client that overfills the signer queue gets `busy` for what does not fit, and those
/// refusals share the refusals' audit budget with no warning line each: a burst cannot
/// flood the log (one was seen writing 60,000 lines a second). Every signature made is
/// still on record.
#[test]
fn busy_signatures_share_the_refusal_budget() {
    let mut builder = TestAgent::builder();
    builder.sign_delay = Duration::from_millis(5);
    let agent = builder.start();
    let started = Instant::now();
    let mut conns: Vec<Raw> = (0..8).map(|_| Raw::connect(&agent)).collect();
    let batch: String = (0..64)
        .map(|id| {
            format!("{{\"v\":1,\"id\":{id},\"op\":\"sign_challenge\",\"profile\":\"prod\"}}\n")
        })
        .collect();
    for raw in &mut conns {
        raw.send(&batch);
    }
    let (mut ok, mut busy) = (0, 0);
    for raw in &mut conns {
        for _ in 0..64 {
            let reply = raw.recv();
            match code(&reply) {
                "" => ok += 1,
                "busy" => busy += 1,
                other => panic!("unexpected {other}: {reply}"),
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        busy >= 100,
        "the queue (256) overflowed: {ok} ok, {busy} busy"
    );
    let logs = agent.logs.text();
    let records = |result: &str| {
        logs.lines()
            .filter(|l| l.contains(" audit:") && l.contains(&format!("result=\"{result}\"")))
            .count()
    };
    assert_eq!(records("ok"), ok, "every signature is on record");
    let budget = 100 + (elapsed * 10.0).ceil() as usize + 1;
    assert!(
        records("busy") <= budget,
        "{} of {busy} busy refusals logged in {elapsed:.2} s",
        records("busy")
    );
    assert!(
        !logs.contains("signing failed"),
        "no warning per busy request: {logs}"
    );
}

/// Once shutdown begins, the socket file is gone and a new client fails at once, while a
/// request already in flight still gets its answer.
#[test]
fn shutdown_removes_the_socket_at_once_and_finishes_in_flight_requests() {
    let mut builder = TestAgent::builder();
    builder.sign_delay = Duration::from_millis(1500);
    let agent = builder.start();
    let mut raw = Raw::connect(&agent);
    raw.send("{\"v\":1,\"id\":1,\"op\":\"sign_challenge\",\"profile\":\"prod\"}\n");
    std::thread::sleep(Duration::from_millis(200)); // the signer has the job
    agent.begin_stop();
    let gone = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !agent.socket.exists()
    });
    assert!(gone, "the socket file is removed when accepting stops");
    let started = Instant::now();
    assert!(std::os::unix::net::UnixStream::connect(&agent.socket).is_err());
    assert!(started.elapsed() < Duration::from_millis(100));
    let reply = raw.recv();
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert!(reply["result"]["signature"].is_string(), "{reply}");
    agent.stop().unwrap();
}
