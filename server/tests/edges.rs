//! End to end against the real `confluo-server` binary: the edges a client
//! or an operator reaches first (token checks, error answers, start-up
//! checks), over raw HTTP so that nothing between us and the server tidies
//! the request.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use confluo_core::{Database, Value};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

const BIN: &str = env!("CARGO_BIN_EXE_confluo-server");
const CHANGESET_TYPE: &str = "application/vnd.confluo.changeset";
const SECRET: &str = "0123456789abcdef0123456789abcdef-edges";
const WRITER: &str = "team-writer-token-3f9a";

// ---------------------------------------------------------------------------
// The server process

/// A running `confluo-server`; dropping it kills the process and reaps it.
struct Server {
    child: Child,
    host: String,
    port: u16,
    log: PathBuf,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

impl Server {
    /// Starts the binary on `host`:(a free port), its database and log in
    /// `dir`, with the extra `args`; waits until `/healthz` answers.
    fn start_on(host: &str, dir: &Path, args: &[&str]) -> Server {
        let log = dir.join("server.log");
        let mut failures = Vec::new();
        for _ in 0..5 {
            let port = free_port();
            let out = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("log file");
            let err = out.try_clone().expect("log file");
            let mut child = Command::new(BIN)
                .arg("--listen")
                .arg(format!("{host}:{port}"))
                .arg("--db")
                .arg(dir.join("server.db"))
                .args(args)
                .env("RUST_LOG", "info")
                .env_remove("NO_COLOR")
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn()
                .expect("spawn the server");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().expect("wait for the server") {
                    failures.push(format!(
                        "exited with {status}; log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    ));
                    break;
                }
                let health = send(host, port, "GET", "/healthz", &[], b"");
                if health.is_ok_and(|r| r.status == 200) {
                    let host = host.to_owned();
                    return Server {
                        child,
                        host,
                        port,
                        log,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    failures.push("no answer from /healthz".into());
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        panic!("the server did not start: {failures:#?}");
    }

    fn start(dir: &Path, args: &[&str]) -> Server {
        Self::start_on("127.0.0.1", dir, args)
    }

    fn request(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        send(&self.host, self.port, method, target, headers, body)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    /// `POST /v1/spaces/{space}/sync` with the protocol header and `headers`.
    fn sync(&self, space: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut all = vec![("confluo-protocol", "1")];
        all.extend_from_slice(headers);
        self.request("POST", &format!("/v1/spaces/{space}/sync"), &all, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with `args`, expecting it to exit within 20 s (it is
/// killed otherwise, and the answer says it was still running).
fn run_to_exit(args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.log");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("spawn the server");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(s) => (s.success(), text),
        None => (true, format!("STILL RUNNING after 20 s; output:\n{text}")),
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an error answer: `status`, a JSON content type and a body
    /// `{"error": {"code": code, "message": "..."}}`; returns the message.
    fn assert_error(&self, what: &str, status: u16, code: &str) -> String {
        assert_eq!(
            self.status,
            status,
            "{what}: status (body {:?})",
            self.text()
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{what}: content type (body {:?})",
            self.text()
        );
        let json: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {:?}", self.text()));
        assert_eq!(
            json["error"]["code"].as_str(),
            Some(code),
            "{what}: error code in {json}"
        );
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: error message in {json}");
        message.to_owned()
    }

    fn assert_ok(&self, what: &str) {
        assert_eq!(self.status, 200, "{what}: status (body {:?})", self.text());
    }
}

/// One HTTP/1.1 request on a fresh connection, sent exactly as given.
fn send(
    host: &str,
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    // A host name: every address it resolves to is tried.
    let mut stream = TcpStream::connect((host, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_reply(&raw).ok_or_else(|| std::io::Error::other(format!("unparsable answer {raw:?}")))
}

fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        let (mut rest, mut out) = (&body[..], Vec::new());
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n")?;
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).ok()?, 16).ok()?;
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(eol + 2..eol + 2 + size)?);
            rest = rest.get(eol + 4 + size..)?;
        }
        body = out;
    }
    Some(Reply {
        status,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------
// Tokens and change sets

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn write_auth(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("auth.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A change set of one new row of `todo`, as a device would push it.
fn one_row_push() -> confluo_core::ChangeSet {
    rows_push(1)
}

/// `rows` todo rows, `t1`, `t2`...
fn rows_push(rows: usize) -> confluo_core::ChangeSet {
    let db = Database::open_in_memory().unwrap();
    db.execute_batch("CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, score REAL)")
        .unwrap();
    db.enable_sync("todo").unwrap();
    for i in 1..=rows {
        db.execute(
            "INSERT INTO todo VALUES (?1, 'Plan the offsite', 1.5)",
            &[format!("t{i}").into()],
        )
        .unwrap();
    }
    db.changes_since(0, None).unwrap()
}

// ---------------------------------------------------------------------------
// Finding 5: JWT claims

#[test]
fn jwts_are_checked_for_not_before_issuer_audience_and_wildcards() {
    let dir = tempfile::tempdir().unwrap();
    let auth = write_auth(
        dir.path(),
        &format!(
            r#"jwt_secret = "{SECRET}"
jwt_issuer = "https://backend.example"
jwt_audience = "confluo-sync"
"#
        ),
    );
    let server = Server::start(dir.path(), &["--auth", auth.to_str().unwrap()]);
    let claims = |extra: serde_json::Value| {
        let mut c = serde_json::json!({
            "user": "bob", "spaces": ["team"], "mode": "read-write",
            "exp": now() + 600, "iss": "https://backend.example", "aud": "confluo-sync",
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        format!("Bearer {}", jwt(c))
    };
    let pull = |token: &str| server.sync("team", &[("authorization", token)], b"");

    pull(&claims(serde_json::json!({}))).assert_ok("a good token");
    pull(&claims(serde_json::json!({"nbf": now() - 10}))).assert_ok("a token valid since 10 s ago");
    // Within the documented leeway of 60 s for clocks that differ.
    pull(&claims(serde_json::json!({"exp": now() - 30})))
        .assert_ok("a token expired 30 s ago (leeway)");
    pull(&claims(serde_json::json!({"nbf": now() + 30})))
        .assert_ok("a token valid in 30 s (leeway)");

    let refused: [(&str, serde_json::Value); 8] = [
        (
            "valid only from an hour ahead",
            serde_json::json!({"nbf": now() + 3600}),
        ),
        (
            "expired two minutes ago",
            serde_json::json!({"exp": now() - 120}),
        ),
        ("no issuer", serde_json::json!({"iss": null})),
        (
            "another issuer",
            serde_json::json!({"iss": "https://evil.example"}),
        ),
        ("no audience", serde_json::json!({"aud": null})),
        (
            "another audience",
            serde_json::json!({"aud": "someone-else"}),
        ),
        (
            "a wildcard space not enabled",
            serde_json::json!({"spaces": ["*"]}),
        ),
        ("no expiry", serde_json::json!({"exp": null})),
    ];
    for (what, extra) in refused {
        pull(&claims(extra)).assert_error(what, 401, "unauthorized");
    }

    // An operator who wants wildcard JWTs says so; static tokens the
    // operator wrote with "*" work either way.
    let dir = tempfile::tempdir().unwrap();
    let auth = write_auth(
        dir.path(),
        &format!(
            r#"jwt_secret = "{SECRET}"
jwt_allow_wildcard = true

[[tokens]]
token = "{WRITER}"
user = "ops"
spaces = ["*"]
mode = "read"
"#
        ),
    );
    let server = Server::start(dir.path(), &["--auth", auth.to_str().unwrap()]);
    let wildcard = jwt(serde_json::json!({
        "user": "admin", "spaces": ["*"], "mode": "read", "exp": now() + 600,
    }));
    server
        .sync(
            "any",
            &[("authorization", &format!("Bearer {wildcard}"))],
            b"",
        )
        .assert_ok("a wildcard JWT where the operator enabled them");
    server
        .sync(
            "other",
            &[("authorization", &format!("Bearer {WRITER}"))],
            b"",
        )
        .assert_ok("a static wildcard token");

    // Without the setting, the operator's static "*" token still works.
    let dir = tempfile::tempdir().unwrap();
    let auth = write_auth(
        dir.path(),
        &format!(
            r#"jwt_secret = "{SECRET}"

[[tokens]]
token = "{WRITER}"
user = "ops"
spaces = ["*"]
mode = "read"
"#
        ),
    );
    let server = Server::start(dir.path(), &["--auth", auth.to_str().unwrap()]);
    server
        .sync(
            "any",
            &[("authorization", &format!("Bearer {wildcard}"))],
            b"",
        )
        .assert_error("a wildcard JWT by default", 401, "unauthorized");
    server
        .sync(
            "other",
            &[("authorization", &format!("Bearer {WRITER}"))],
            b"",
        )
        .assert_ok("a static wildcard token by default");
}

// ---------------------------------------------------------------------------
// Finding 7: auth errors in our own words

#[test]
fn refused_tokens_are_told_in_plain_words_without_internals() {
    let dir = tempfile::tempdir().unwrap();
    let auth = write_auth(
        dir.path(),
        &format!(
            r#"jwt_secret = "{SECRET}"

[[tokens]]
token = "{WRITER}"
user = "writer"
spaces = ["team"]
mode = "read-write"
"#
        ),
    );
    let server = Server::start(dir.path(), &["--auth", auth.to_str().unwrap()]);
    let claims = serde_json::json!({
        "user": "bob", "spaces": ["team"], "mode": "read-write", "exp": now() + 600,
    });
    let b64 = |v: &serde_json::Value| {
        use std::fmt::Write;
        // base64url without padding, enough for a test token.
        const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = v.to_string().into_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                let _ = write!(out, "{}", ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(&claims)
    );
    let good = jwt(claims.clone());
    let forged = {
        let (rest, _) = good.rsplit_once('.').unwrap();
        format!("{rest}.{}", "A".repeat(43))
    };
    let mut expired = claims.clone();
    expired["exp"] = (now() - 3600).into();
    let mut early = claims.clone();
    early["nbf"] = (now() + 3600).into();
    let cases = [
        (
            "an unknown static token",
            "not-a-token-we-know".to_owned(),
            "the token is not valid",
        ),
        ("alg=none", alg_none, "the token is not valid"),
        ("a forged signature", forged, "the token is not valid"),
        ("garbage", "a.b.c".to_owned(), "the token is not valid"),
        ("an expired JWT", jwt(expired), "the token has expired"),
        (
            "a JWT valid from an hour ahead",
            jwt(early),
            "the token is not valid yet",
        ),
    ];
    for (what, token, words) in cases {
        let message = server
            .sync(
                "team",
                &[("authorization", &format!("Bearer {token}"))],
                b"",
            )
            .assert_error(what, 401, "unauthorized");
        assert_eq!(message, words, "{what}");
    }
    let message = server
        .sync("team", &[], b"")
        .assert_error("no token", 401, "unauthorized");
    assert_eq!(message, "missing bearer token");
    server
        .sync("team", &[("authorization", &format!("Bearer {good}"))], b"")
        .assert_ok("the good JWT");

    // The log tells the operator which check failed.
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("ExpiredSignature"), "{log}");

    // Without a JWT secret too.
    let dir = tempfile::tempdir().unwrap();
    let auth = write_auth(
        dir.path(),
        &format!("[[tokens]]\ntoken = \"{WRITER}\"\nuser = \"w\"\nspaces = [\"team\"]\nmode = \"read\"\n"),
    );
    let server = Server::start(dir.path(), &["--auth", auth.to_str().unwrap()]);
    let message = server
        .sync(
            "team",
            &[("authorization", "Bearer not-a-token-we-know")],
            b"",
        )
        .assert_error("an unknown token, no JWTs", 401, "unauthorized");
    assert_eq!(message, "the token is not valid");
}

// ---------------------------------------------------------------------------
// Finding 6: every error is JSON, and odd requests are refused

const AUTH: (&str, &str) = ("authorization", "Bearer dev-token");

#[test]
fn query_errors_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    let headers = [("confluo-protocol", "1"), AUTH];
    let cases = [
        ("POST", "/v1/spaces/lists/sync?cursor=-1"),
        ("POST", "/v1/spaces/lists/sync?cursor=abc"),
        ("POST", "/v1/spaces/lists/sync?cursor=0&cursor=0"),
        (
            "POST",
            "/v1/spaces/lists/sync?cursor=99999999999999999999999",
        ),
        ("POST", "/v1/spaces/lists/sync?pushed_at=x"),
        ("GET", "/v1/spaces/lists/changes?cursor=-1"),
        ("GET", "/v1/spaces/lists/changes?wait=-1"),
        ("GET", "/v1/spaces/lists/changes?wait=1.5"),
        ("GET", "/v1/spaces/lists/changes?cursor=0&cursor=1"),
    ];
    for (method, target) in cases {
        let what = format!("{method} {target}");
        let reply = server.request(method, target, &headers, b"");
        reply.assert_error(&what, 400, "invalid_query");
        assert!(
            reply.header("confluo-server-time").is_some(),
            "{what}: the server's clock"
        );
    }
    // Parameters this server does not know are left alone (newer devices).
    server
        .request(
            "POST",
            "/v1/spaces/lists/sync?cursor=0&future=1&future=2",
            &headers,
            b"",
        )
        .assert_ok("unknown parameters");
}

#[test]
fn unknown_paths_and_methods_are_answered_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    let headers = [("confluo-protocol", "1"), AUTH];
    for target in [
        "/",
        "/nope",
        "/v1/spaces/lists/nope",
        "/v2/spaces/lists/sync",
    ] {
        server.request("GET", target, &headers, b"").assert_error(
            &format!("GET {target}"),
            404,
            "not_found",
        );
    }
    for (method, target, allow) in [
        ("GET", "/v1/spaces/lists/sync", "POST"),
        ("POST", "/v1/spaces/lists/changes", "GET,HEAD"),
        ("DELETE", "/healthz", "GET,HEAD"),
    ] {
        let what = format!("{method} {target}");
        let reply = server.request(method, target, &headers, b"");
        reply.assert_error(&what, 405, "method_not_allowed");
        assert_eq!(reply.header("allow"), Some(allow), "{what}");
    }
}

#[test]
fn odd_pushes_are_refused_with_the_right_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    let ctype = ("content-type", CHANGESET_TYPE);
    let push = one_row_push();
    let body = push.encode();

    // NaN decodes but is no value a device keeps: invalid_changes.
    let mut nan = push.clone();
    let real = nan
        .changes
        .iter()
        .position(|c| matches!(c.value, Value::Real(_)))
        .expect("a REAL cell");
    nan.changes[real].value = Value::Real(f64::NAN);
    server
        .sync("lists", &[AUTH, ctype], &nan.encode())
        .assert_error("NaN", 400, "invalid_changes");

    for space in [".", "..", "%2E", "%2e%2E"] {
        server.sync(space, &[AUTH, ctype], &body).assert_error(
            &format!("space {space}"),
            400,
            "invalid_space",
        );
        server
            .request(
                "GET",
                &format!("/v1/spaces/{space}/changes"),
                &[("confluo-protocol", "1"), AUTH],
                b"",
            )
            .assert_error(&format!("GET space {space}"), 400, "invalid_space");
    }
    server.sync("%FF", &[AUTH, ctype], &body).assert_error(
        "a space that is not UTF-8",
        400,
        "invalid_space",
    );

    server
        .sync("lists", &[AUTH, ctype, ("confluo-push-part", "1/2")], &body)
        .assert_error("a part without a push id", 400, "invalid_push_part");

    for (what, headers) in [
        ("no content type", vec![AUTH]),
        ("JSON", vec![AUTH, ("content-type", "application/json")]),
        (
            "octets",
            vec![AUTH, ("content-type", "application/octet-stream")],
        ),
    ] {
        let message =
            server
                .sync("lists", &headers, &body)
                .assert_error(what, 415, "unsupported_media_type");
        assert!(message.contains(CHANGESET_TYPE), "{what}: {message}");
    }

    // Nothing above was stored; a pull with any content type still works,
    // and the proper push is taken.
    let pull = server.sync("lists", &[AUTH, ("content-type", "text/plain")], b"");
    pull.assert_ok("a pull");
    let cs = confluo_core::ChangeSet::decode(&pull.body).unwrap();
    assert_eq!(cs.until, 0, "nothing was stored");
    let reply = server.sync(
        "lists",
        &[
            AUTH,
            ("content-type", "application/vnd.confluo.changeset; v=1"),
        ],
        &body,
    );
    reply.assert_ok("the changeset type, with a parameter");
    assert_eq!(reply.header("confluo-server-version"), Some("1"));
}

#[test]
fn the_bearer_scheme_is_matched_without_regard_to_case() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    for header in ["Bearer dev-token", "bearer dev-token", "BEARER  dev-token"] {
        server
            .sync("lists", &[("authorization", header)], b"")
            .assert_ok(header);
    }
    server
        .sync("lists", &[("authorization", "Basic dev-token")], b"")
        .assert_error("another scheme", 401, "unauthorized");
}

// ---------------------------------------------------------------------------
// Finding 10: operator experience

#[test]
fn auth_files_with_unknown_keys_or_that_grant_nothing_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let cases = [
        (
            "a misspelt key",
            format!("jwt_secrets = \"{SECRET}\"\n"),
            "jwt_secrets",
        ),
        (
            "an unknown key in a token",
            format!("[[tokens]]\ntoken = \"{WRITER}\"\nuser = \"w\"\nspaces = [\"t\"]\nmode = \"read\"\nspace = \"x\"\n"),
            "space",
        ),
        ("an empty file", String::new(), "grants nothing"),
        (
            "a token without spaces",
            format!("[[tokens]]\ntoken = \"{WRITER}\"\nuser = \"w\"\nspaces = []\nmode = \"read\"\n"),
            "grants no space",
        ),
        (
            "an issuer without a secret",
            format!("jwt_issuer = \"x\"\n[[tokens]]\ntoken = \"{WRITER}\"\nuser = \"w\"\nspaces = [\"t\"]\nmode = \"read\"\n"),
            "jwt_issuer",
        ),
    ];
    for (what, text, problem) in cases {
        let file = dir.path().join("my-auth.toml");
        std::fs::write(&file, text).unwrap();
        let (ok, out) = run_to_exit(&[
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--auth",
            file.to_str().unwrap(),
        ]);
        assert!(!ok, "{what}: the server started:\n{out}");
        assert!(
            out.contains("my-auth.toml"),
            "{what}: the file name in\n{out}"
        );
        assert!(out.contains(problem), "{what}: {problem:?} in\n{out}");
    }
}

#[test]
fn help_points_at_the_auth_file_format() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("PROTOCOL.md, section Tokens"), "{help}");
    assert!(help.contains("[[tokens]]"), "{help}");
    assert!(help.contains("jwt_secret"), "{help}");
}

#[test]
fn listen_takes_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on("localhost", dir.path(), &["--dev"]);
    server
        .sync("lists", &[AUTH], b"")
        .assert_ok("a pull from the server on localhost");
    // Still refused where --dev would not be on loopback only.
    let db = dir.path().join("other.db");
    let (ok, out) = run_to_exit(&[
        "--dev",
        "--listen",
        "0.0.0.0:0",
        "--db",
        db.to_str().unwrap(),
    ]);
    assert!(
        !ok && out.contains("only allowed on a loopback address"),
        "{out}"
    );
    let (ok, out) = run_to_exit(&[
        "--dev",
        "--listen",
        "no-such-host.invalid:7878",
        "--db",
        db.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("no-such-host.invalid:7878"), "{out}");
}

#[test]
fn logs_have_no_colour_codes_when_not_at_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev"]);
    server
        .sync("lists", &[("authorization", "Bearer wrong-token")], b"")
        .assert_error("a refused request, to be logged", 401, "unauthorized");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("confluo-server listening"), "{log}");
    assert!(log.contains("token refused"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in the log:\n{log:?}");
}

#[test]
fn start_up_errors_are_one_readable_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my-auth.toml");
    std::fs::write(&file, "").unwrap();
    let db = dir.path().join("s.db");
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--auth", file.to_str().unwrap()])
        .arg("--db")
        .arg(&db)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("confluo-server: the auth file "), "{err}");
    assert!(err.contains("my-auth.toml: it grants nothing"), "{err}");
    assert!(!err.contains("backtrace"), "{err}");
}

#[test]
fn pushes_and_pages_travel_compressed_with_zstd_when_asked() {
    use confluo_core::coding;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--dev", "--max-body-bytes", "65536"]);
    let ctype = ("content-type", CHANGESET_TYPE);
    // Long enough to be worth compressing (`coding::MIN_COMPRESSED_BYTES`).
    let body = rows_push(20).encode();
    assert!(body.len() >= coding::MIN_COMPRESSED_BYTES);

    let reply = server.sync(
        "lists",
        &[AUTH, ctype, ("content-encoding", "zstd")],
        &coding::compress(&body),
    );
    reply.assert_ok("a zstd push");
    assert_eq!(reply.header("confluo-server-version"), Some("1"));
    assert_eq!(reply.header("accept-encoding"), Some("zstd"));

    // What a device could not send: each refused, nothing stored.
    let bomb = coding::compress(&vec![0u8; 1 << 20]);
    assert!(bomb.len() < 65536);
    for (what, coding, sent, status, code) in [
        (
            "a body that decodes past the limit",
            "zstd",
            bomb,
            413,
            "too_large",
        ),
        (
            "a body that is not zstd",
            "zstd",
            body.clone(),
            400,
            "malformed",
        ),
        (
            "another coding",
            "gzip",
            body.clone(),
            415,
            "unsupported_encoding",
        ),
    ] {
        server
            .sync("other", &[AUTH, ctype, ("content-encoding", coding)], &sent)
            .assert_error(what, status, code);
    }

    let plain = server.sync("lists", &[AUTH], b"");
    plain.assert_ok("a plain pull");
    assert_eq!(plain.header("content-encoding"), None);
    let packed = server.sync("lists", &[AUTH, ("accept-encoding", "gzip, zstd")], b"");
    packed.assert_ok("a pull that takes zstd");
    assert_eq!(packed.header("content-encoding"), Some("zstd"));
    assert_eq!(packed.header("vary"), Some("accept-encoding"));
    assert_eq!(
        coding::decompress(&packed.body, 1 << 20).unwrap(),
        plain.body,
        "the same page"
    );
    let refused = server.sync("lists", &[AUTH, ("accept-encoding", "zstd;q=0")], b"");
    assert_eq!(refused.header("content-encoding"), None);
    // A page too short to gain from it goes plain, even to a client that
    // takes zstd.
    let one_row = one_row_push().encode();
    assert!(one_row.len() < coding::MIN_COMPRESSED_BYTES);
    server
        .sync("short", &[AUTH, ctype], &one_row)
        .assert_ok("a one-row push");
    let short = server.sync("short", &[AUTH, ("accept-encoding", "zstd")], b"");
    short.assert_ok("a short page");
    assert_eq!(short.header("content-encoding"), None);
    assert_eq!(
        confluo_core::ChangeSet::decode(&short.body)
            .unwrap()
            .changes
            .len(),
        one_row_push().changes.len()
    );
    let nothing = server.sync("other", &[AUTH], b"");
    assert_eq!(
        confluo_core::ChangeSet::decode(&nothing.body)
            .unwrap()
            .until,
        0
    );
}
