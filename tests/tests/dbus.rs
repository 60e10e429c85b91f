//! End-to-end tests of gemmad's D-Bus front end (docs/dbus.md): each test runs its own
//! private `dbus-daemon` and the real `gemmad serve --dbus session|system` on the tiny
//! fixture, and drives it with zbus and with `busctl`/`gdbus` as independent clients.
//! Tests that run a client under another uid need root and setpriv; all need dbus-daemon,
//! busctl and gdbus (`.ci/run` installs them; under GEMMAD_REQUIRE_TEST_DATA=1 a missing
//! one fails the test). No test asserts wall-clock times; waits have generous timeouts
//! only to turn a hang into a failure.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gemmad_client::dbus::{Bus, DbusClient};
use gemmad_client::{message, pb, text_part, user_prompt, Generation};
use gemmad_e2e::{Daemon, PrivateBus, DBUS_NAME, HANG};
use tokio_stream::StreamExt;
use zbus::{DBusError, MatchRule, MessageStream, OwnedObjectPath, OwnedVariant, Variant};

const PATH: &str = "/org/gemmad/Gemmad1";
const IFACE: &str = "org.gemmad.Gemmad1";
const REQUEST_IFACE: &str = "org.gemmad.Gemmad1.Request";
const REQUEST_PREFIX: &str = "/org/gemmad/Gemmad1/request";
const INVALID: &str = "org.gemmad.Gemmad1.Error.InvalidArgument";
const BUSY: &str = "org.gemmad.Gemmad1.Error.Busy";
const DENIED: &str = "org.gemmad.Gemmad1.Error.PermissionDenied";
const NO_MODALITY: &str = "org.gemmad.Gemmad1.Error.ModalityUnavailable";
const UNAVAILABLE: &str = "org.gemmad.Gemmad1.Error.Unavailable";
const UNKNOWN_OBJECT: &str = "org.freedesktop.DBus.Error.UnknownObject";
const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
/// The uid that clients run under with setpriv (nobody).
const OTHER_UID: u32 = 65534;

#[zbus::proxy(
    interface = "org.gemmad.Gemmad1",
    default_service = "org.gemmad.Gemmad1",
    default_path = "/org/gemmad/Gemmad1"
)]
trait Gemmad1 {
    fn generate(&self, request: HashMap<&str, Variant<'_>>) -> zbus::Result<OwnedObjectPath>;
    fn tokenize(&self, text: &str) -> zbus::Result<Vec<u32>>;
    fn detokenize(&self, ids: &[u32]) -> zbus::Result<String>;
    fn tokenize_with(&self, input: HashMap<&str, Variant<'_>>) -> zbus::Result<(Vec<u32>, u32)>;
    fn get_status(&self) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn set_slice(
        &self,
        name: &str,
        force: bool,
    ) -> zbus::Result<(String, u32, HashMap<String, OwnedVariant>)>;
    fn load_modality(&self, modality: &str) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn governor_pin(&self, tier: &str) -> zbus::Result<()>;
    fn cache_prompt(
        &self,
        args: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn drop_cached_prompt(&self, key: &str) -> zbus::Result<()>;
    #[zbus(property)]
    fn queue_depth(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn active_slice(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.gemmad.Gemmad1.Request",
    default_service = "org.gemmad.Gemmad1"
)]
trait Request {
    fn cancel(&self) -> zbus::Result<()>;
}

/// A private bus and gemmad serving on it. The daemon is dropped (killed) before the bus.
struct Served {
    daemon: Daemon,
    bus: PrivateBus,
}

/// The bus (session-like; `any_user`: other uids may connect) and gemmad on `model` with
/// `config` plus these tests' defaults (one compute thread, room for [`long`] requests),
/// or `None` when the D-Bus tools are missing (a failure under CI).
fn serve_on(test: &str, model: &Path, config: &str, any_user: bool) -> Option<Served> {
    if !gemmad_e2e::dbus_tools_or_skip(test) {
        return None;
    }
    let bus = if any_user {
        PrivateBus::session_any_user()
    } else {
        PrivateBus::session()
    }
    .expect("starting a private dbus-daemon");
    let config = config.strip_prefix("[model]\n").unwrap_or(config);
    let limits = if config.contains("[limits]") {
        ""
    } else {
        "[limits]\nmax_tokens = 30000\n"
    };
    let daemon = Daemon::builder()
        .model(model)
        .config(format!("[model]\nthreads = 1\n{config}{limits}"))
        .dbus(&bus)
        .start()
        .expect("starting gemmad --dbus session");
    Some(Served { daemon, bus })
}

fn serve(test: &str, config: &str) -> Option<Served> {
    serve_on(test, Path::new(gemmad_e2e::FIXTURE), config, false)
}

/// Whether this process may run clients as [`OTHER_UID`]; skips (fails in CI) if not.
fn can_switch_uid(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !(root && Path::new("/usr/bin/setpriv").exists()) {
        gemmad_e2e::skip(&format!("{test} needs root and /usr/bin/setpriv"));
        return false;
    }
    true
}

/// An `a{sv}` request.
fn req<'a>(pairs: &[(&'a str, Variant<'a>)]) -> HashMap<&'a str, Variant<'a>> {
    pairs.iter().map(|(k, v)| (*k, v.clone())).collect()
}

/// A seeded request for `max_tokens`.
fn seeded<'a>(prompt: &'a str, seed: u64, max_tokens: u32) -> HashMap<&'a str, Variant<'a>> {
    req(&[
        ("prompt", prompt.into()),
        ("seed", seed.into()),
        ("max_tokens", max_tokens.into()),
    ])
}

/// A request that runs until cancelled (30000 tokens take the tiny model far longer
/// than any test lets it run).
fn long() -> HashMap<&'static str, Variant<'static>> {
    req(&[
        ("prompt", "tell me everything".into()),
        ("seed", 7u64.into()),
        ("max_tokens", 30000u32.into()),
        ("ignore_eos", true.into()),
    ])
}

fn grpc_seeded(prompt: &str, seed: u64, max_tokens: u32) -> pb::GenerateRequest {
    let mut r = user_prompt(prompt);
    r.sampling = Some(pb::Sampling {
        seed: Some(seed),
        ..Default::default()
    });
    r.max_tokens = max_tokens;
    r
}

/// The error name and message of a failed call.
fn named(e: &zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, detail, _) => {
            (name.to_string(), detail.clone().unwrap_or_default())
        }
        zbus::Error::FDO(f) => (
            f.name().to_string(),
            f.description().unwrap_or_default().to_string(),
        ),
        other => (format!("not an error reply: {other:?}"), String::new()),
    }
}

/// Asserts that `r` failed with the error `name` and a message containing `part`.
#[track_caller]
fn assert_error<T: std::fmt::Debug>(r: zbus::Result<T>, name: &str, part: &str) {
    let e = r.expect_err(&format!("expected {name}"));
    let (got, msg) = named(&e);
    assert_eq!(got, name, "{e:?}");
    assert!(
        msg.contains(part),
        "{name}: {msg:?} does not contain {part:?}"
    );
}

/// One client connection, subscribed to the request signals (before any Generate, as
/// docs/dbus.md asks).
struct Caller {
    conn: zbus::Connection,
    proxy: Gemmad1Proxy<'static>,
    signals: MessageStream,
}

fn request_rule() -> MatchRule<'static> {
    MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(DBUS_NAME)
        .interface(REQUEST_IFACE)
        .path_namespace(REQUEST_PREFIX)
        .build()
        .expect("a match rule")
}

async fn caller(bus: &PrivateBus) -> Caller {
    let conn = bus.connect().await.expect("connecting to the bus");
    let signals = MessageStream::for_match_rule(request_rule(), &conn, NonZeroUsize::new(100_000))
        .await
        .expect("adding the match rule");
    // Properties read through it are asked of gemmad each time (no cache that a
    // PropertiesChanged may not have updated yet).
    let proxy = Gemmad1Proxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("a proxy");
    Caller {
        conn,
        proxy,
        signals,
    }
}

/// A request object's signal.
#[derive(Debug)]
enum Signal {
    Token(String, Vec<u32>),
    Finished(String, HashMap<String, OwnedVariant>),
    Failed(String, String),
}

impl Caller {
    async fn generate(&self, r: HashMap<&str, Variant<'_>>) -> zbus::Result<OwnedObjectPath> {
        self.proxy.generate(r).await
    }

    /// The next signal of the request at `path` (those of other requests are skipped).
    async fn next(&mut self, path: &str) -> Signal {
        loop {
            let msg = tokio::time::timeout(HANG, self.signals.next())
                .await
                .expect("no request signal within HANG")
                .expect("the signal stream ended")
                .expect("a signal");
            let h = msg.header();
            if h.path().map(|p| p.as_str()) != Some(path) {
                continue;
            }
            let body = msg.body();
            return match h.member().map(|m| m.as_str()) {
                Some("Token") => {
                    let (t, ids): (String, Vec<u32>) = body.deserialize().unwrap();
                    Signal::Token(t, ids)
                }
                Some("Finished") => {
                    let (r, u): (String, HashMap<String, OwnedVariant>) =
                        body.deserialize().unwrap();
                    Signal::Finished(r, u)
                }
                Some("Failed") => {
                    let (n, m): (String, String) = body.deserialize().unwrap();
                    Signal::Failed(n, m)
                }
                other => panic!("unexpected signal {other:?} on {path}"),
            };
        }
    }

    /// Collects the request's tokens until its end: (text, ids, reason, usage).
    async fn until_end(&mut self, path: &str) -> (String, Vec<u32>, String, HashMap<String, u64>) {
        let (mut text, mut ids) = (String::new(), Vec::new());
        loop {
            match self.next(path).await {
                Signal::Token(t, i) => {
                    assert!(!i.is_empty(), "a Token without ids: {t:?}");
                    text.push_str(&t);
                    ids.extend(i);
                }
                Signal::Finished(reason, usage) => return (text, ids, reason, numbers(usage)),
                Signal::Failed(n, m) => panic!("request {path} failed: {n}: {m}"),
            }
        }
    }

    /// Waits for the request's first Token (it is running).
    async fn first_token(&mut self, path: &str) -> Vec<u32> {
        match self.next(path).await {
            Signal::Token(_, ids) => ids,
            other => panic!("expected a Token first, got {other:?}"),
        }
    }

    async fn request(&self, path: &str) -> RequestProxy<'static> {
        RequestProxy::builder(&self.conn)
            .path(path.to_string())
            .build()
            .await
            .unwrap()
    }
}

/// The integer entries of a usage dict, widened (request_id t; the counts u).
fn numbers(usage: HashMap<String, OwnedVariant>) -> HashMap<String, u64> {
    usage
        .into_iter()
        .filter_map(|(k, v)| {
            let n = match &*v {
                Variant::U32(n) => u64::from(*n),
                Variant::U64(n) => *n,
                _ => return None,
            };
            Some((k, n))
        })
        .collect()
}

/// GetStatus's `requests` counters.
async fn counters(p: &Gemmad1Proxy<'_>) -> HashMap<String, u64> {
    let mut s = p.get_status().await.expect("GetStatus");
    HashMap::<String, u64>::try_from(s.remove("requests").expect("requests")).unwrap()
}

/// Polls GetStatus's counters until `pred` holds (or fails after [`HANG`]).
async fn wait_counters(
    p: &Gemmad1Proxy<'_>,
    what: &str,
    pred: impl Fn(&HashMap<String, u64>) -> bool,
) -> HashMap<String, u64> {
    let t0 = Instant::now();
    loop {
        let c = counters(p).await;
        if pred(&c) {
            return c;
        }
        assert!(t0.elapsed() < HANG, "timed out waiting for {what}: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the request object at `path` is gone (calls on it: UnknownObject).
async fn wait_gone(c: &Caller, path: &str) {
    let r = c.request(path).await;
    let t0 = Instant::now();
    loop {
        match r.cancel().await {
            Err(e) if named(&e).0 == UNKNOWN_OBJECT => return,
            other => assert!(
                t0.elapsed() < HANG,
                "{path} still answers after its end: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a command to completion off the async runtime.
async fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null());
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"))
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// `busctl --user ARGS` on the test's bus; asserts success, returns stdout.
async fn busctl_ok(bus: &PrivateBus, args: &[&str]) -> String {
    let mut c = bus.command("busctl");
    c.arg("--user").args(args);
    let o = run(c).await;
    assert!(o.status.success(), "busctl {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `busctl --user ARGS` that must fail; returns its output.
async fn busctl_err(bus: &PrivateBus, args: &[&str]) -> String {
    let mut c = bus.command("busctl");
    c.arg("--user").args(args);
    let o = run(c).await;
    assert!(
        !o.status.success(),
        "busctl {args:?} succeeded:\n{}",
        text(&o)
    );
    text(&o)
}

/// `gdbus call --session` of `IFACE.method` on `path` with `args` (GVariant text).
fn gdbus_call(bus: &PrivateBus, path: &str, method: &str, args: &[&str]) -> Command {
    let mut c = bus.command("gdbus");
    c.args([
        "call",
        "--session",
        "--dest",
        DBUS_NAME,
        "--object-path",
        path,
    ])
    .arg("--method")
    .arg(method)
    .args(args);
    c
}

/// `gdbus ARGS` on the test's bus.
fn bus_gdbus(bus: &PrivateBus, args: &[&str]) -> Command {
    let mut c = bus.command("gdbus");
    c.args(args);
    c
}

/// A command run as [`OTHER_UID`] (setpriv), with the bus's addresses.
fn as_other_uid(bus: &PrivateBus, program: &str) -> Command {
    let mut c = bus.command("/usr/bin/setpriv");
    c.arg(format!("--reuid={OTHER_UID}"))
        .arg(format!("--regid={OTHER_UID}"))
        .args(["--clear-groups", "--", program]);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_shows_the_service_and_its_request_objects() {
    let Some(s) = serve(
        "introspection_shows_the_service_and_its_request_objects",
        "",
    ) else {
        return;
    };
    let out = busctl_ok(&s.bus, &["introspect", DBUS_NAME, PATH]).await;
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let row = |name: &str| -> Vec<&str> {
        rows.iter()
            .find(|r| r.first() == Some(&name))
            .unwrap_or_else(|| panic!("no {name} in busctl introspect:\n{out}"))
            .clone()
    };
    assert_eq!(row(IFACE)[1], "interface");
    for (m, sig, ret) in [
        (".Generate", "a{sv}", "o"),
        (".Tokenize", "s", "au"),
        (".TokenizeWith", "a{sv}", "auu"),
        (".Detokenize", "au", "s"),
        (".DetokenizeWith", "aub", "s"),
        (".ListSlices", "-", "a(sua{sv})"),
        (".SetSlice", "sb", "sua{sv}"),
        (".LoadModality", "s", "a{sv}"),
        (".UnloadModality", "s", "a{sv}"),
        (".GetMemory", "-", "a{st}"),
        (".GetStatus", "-", "a{sv}"),
        (".GovernorPin", "s", "-"),
        (".Shutdown", "-", "-"),
        (".CachePrompt", "a{sv}", "a{sv}"),
        (".DropCachedPrompt", "s", "-"),
    ] {
        assert_eq!(row(m)[1..4], ["method", sig, ret], "{out}");
    }
    for (p, sig, flag) in [
        (".Version", "s", "const"),
        (".Model", "s", "const"),
        (".ContextTokens", "u", "const"),
        (".ActiveSlice", "s", "emits-change"),
        (".LoadedModalities", "as", "emits-change"),
        (".QueueDepth", "u", "emits-change"),
        (".Memory", "a{st}", "emits-change"),
        (".Tier", "s", "emits-change"),
        (".Readings", "a(sds)", "emits-change"),
    ] {
        let r = row(p);
        assert_eq!(r[1..3], ["property", sig], "{out}");
        assert_eq!(r.last(), Some(&flag), "{out}");
    }
    assert_eq!(row(".QueueDepth")[3], "0", "{out}");
    assert_eq!(row(".Tier")[3], "\"\"", "no governor: {out}");
    assert_eq!(
        row(".Model")[3],
        format!("{:?}", gemmad_e2e::FIXTURE),
        "{out}"
    );

    let mut c = bus_gdbus(&s.bus, &["introspect", "--session", "--dest", DBUS_NAME]);
    c.args(["--object-path", PATH]);
    let g = text(&run(c).await);
    for want in [
        "interface org.gemmad.Gemmad1 {",
        "Generate(in  a{sv} request,",
        "out o request_path);",
        "GovernorPin(in  s tier);",
        "CachePrompt(in  a{sv} args,",
        "out a{sv} prompt);",
        "DropCachedPrompt(in  s key);",
        "readonly u QueueDepth = 0;",
        "readonly s Version = '",
    ] {
        assert!(g.contains(want), "no {want:?} in gdbus introspect:\n{g}");
    }

    // A running request has its object, with the Request interface.
    let mut a = caller(&s.bus).await;
    let path = a.generate(long()).await.unwrap();
    let path = path.as_str();
    assert!(path.starts_with(&format!("{REQUEST_PREFIX}/")), "{path}");
    a.first_token(path).await;
    let out = busctl_ok(&s.bus, &["introspect", DBUS_NAME, path]).await;
    for want in [
        "org.gemmad.Gemmad1.Request",
        ".Cancel",
        ".Token ",
        ".Finished ",
        ".Failed ",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    let sig = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_string())
    };
    assert_eq!(sig(".Token").as_deref(), Some("sau"), "{out}");
    assert_eq!(sig(".Finished").as_deref(), Some("sa{sv}"), "{out}");
    assert_eq!(sig(".Failed").as_deref(), Some("ss"), "{out}");
    let mut c = bus_gdbus(&s.bus, &["introspect", "--session", "--dest", DBUS_NAME]);
    c.args(["--object-path", path]);
    let g = text(&run(c).await);
    for want in [
        "interface org.gemmad.Gemmad1.Request {",
        "Cancel();",
        "Token(s text,",
        "au ids);",
        "Finished(s reason,",
    ] {
        assert!(g.contains(want), "no {want:?} in gdbus introspect:\n{g}");
    }
    let tree = busctl_ok(&s.bus, &["tree", DBUS_NAME]).await;
    assert!(tree.contains(path), "{tree}");
    a.request(path).await.cancel().await.unwrap();
    assert!(matches!(
        a.next(path).await,
        Signal::Token(..) | Signal::Finished(..)
    ));
    wait_gone(&a, path).await;
    let tree = busctl_ok(&s.bus, &["tree", DBUS_NAME]).await;
    assert!(!tree.contains(path), "{tree}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stream_and_finish_with_the_grpc_text() {
    let Some(s) = serve("tokens_stream_and_finish_with_the_grpc_text", "") else {
        return;
    };
    let mut a = caller(&s.bus).await;
    let mut g = s.daemon.client().await.unwrap();
    for (prompt, seed, max) in [("hi", 1u64, 16u32), ("Write a poem about the sea.", 42, 48)] {
        let path = a.generate(seeded(prompt, seed, max)).await.unwrap();
        let (text, ids, reason, usage) = a.until_end(path.as_str()).await;
        assert!(
            ["eos", "length", "stop"].contains(&reason.as_str()),
            "{reason}"
        );
        assert_eq!(usage["completion_tokens"], ids.len() as u64, "{usage:?}");
        assert!(usage["prompt_tokens"] > 0, "{usage:?}");
        assert_eq!(
            path.as_str(),
            format!("{REQUEST_PREFIX}/{}", usage["request_id"]),
            "the path names the request id"
        );
        if reason == "length" {
            assert_eq!(ids.len(), max as usize);
        }

        let want = g
            .generate_text(grpc_seeded(prompt, seed, max))
            .await
            .unwrap();
        assert_eq!(text, want.text, "prompt {prompt:?}");
        assert_eq!(ids, want.token_ids, "prompt {prompt:?}");
        let u = want.finished.unwrap().usage.unwrap();
        assert_eq!(usage["prompt_tokens"], u64::from(u.prompt_tokens));
        assert_eq!(usage["completion_tokens"], u64::from(u.completion_tokens));
        wait_gone(&a, path.as_str()).await;
    }
    let n = counters(&a.proxy).await;
    assert_eq!((n["admitted"], n["completed"], n["cancelled"]), (4, 4, 0));
    assert!(s.daemon.log().contains("via=\"dbus\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_is_for_the_owner_and_the_object_goes_away() {
    let Some(s) = serve("cancel_is_for_the_owner_and_the_object_goes_away", "") else {
        return;
    };
    let mut a = caller(&s.bus).await;
    let path = a.generate(long()).await.unwrap();
    let path = path.as_str().to_string();
    let mut got = a.first_token(&path).await.len();

    // Another connection of the same uid may not cancel it: zbus, busctl, gdbus.
    let b = caller(&s.bus).await;
    assert_error(
        b.request(&path).await.cancel().await,
        DENIED,
        "only the caller that started a request may cancel it",
    );
    let out = busctl_err(&s.bus, &["call", DBUS_NAME, &path, REQUEST_IFACE, "Cancel"]).await;
    assert!(out.contains("only the caller that started"), "{out}");
    let out = text(
        &run(gdbus_call(
            &s.bus,
            &path,
            "org.gemmad.Gemmad1.Request.Cancel",
            &[],
        ))
        .await,
    );
    assert!(out.contains(DENIED), "{out}");

    // The owner may; the stream ends with Finished("cancelled").
    a.request(&path).await.cancel().await.unwrap();
    let (reason, usage) = loop {
        match a.next(&path).await {
            Signal::Token(_, ids) => got += ids.len(),
            Signal::Finished(r, u) => break (r, numbers(u)),
            Signal::Failed(n, m) => panic!("{n}: {m}"),
        }
    };
    assert_eq!(reason, "cancelled");
    assert_eq!(usage["completion_tokens"], got as u64, "{usage:?}");

    // The object is gone for every client.
    wait_gone(&a, &path).await;
    let out = busctl_err(&s.bus, &["introspect", DBUS_NAME, &path]).await;
    assert!(out.contains("Unknown object"), "{out}");
    let out = text(
        &run(gdbus_call(
            &s.bus,
            &path,
            "org.gemmad.Gemmad1.Request.Cancel",
            &[],
        ))
        .await,
    );
    assert!(out.contains(UNKNOWN_OBJECT), "{out}");
    let n = wait_counters(&a.proxy, "the cancel counted", |n| n["cancelled"] == 1).await;
    assert_eq!((n["admitted"], n["completed"]), (1, 0), "{n:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_leaves_the_bus_frees_its_queue_slot() {
    let Some(s) = serve(
        "a_caller_that_leaves_the_bus_frees_its_queue_slot",
        "[queue]\nper_peer = 1\n",
    ) else {
        return;
    };
    let mut a = caller(&s.bus).await;
    let path = a.generate(long()).await.unwrap();
    a.first_token(path.as_str()).await;

    // Same uid, other connection: over queue.per_peer.
    let mut b = caller(&s.bus).await;
    assert_error(b.generate(seeded("hi", 1, 8)).await, BUSY, "queue.per_peer");

    // A leaves the bus mid-stream (its connection closed, as when the app exits).
    drop(a);
    let t0 = Instant::now();
    let path = loop {
        match b.generate(seeded("hi", 1, 8)).await {
            Ok(p) => break p,
            Err(e) if named(&e).0 == BUSY => {
                assert!(t0.elapsed() < HANG, "the slot was never freed: {e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    let (_, ids, reason, _) = b.until_end(path.as_str()).await;
    assert!(!ids.is_empty() && reason != "cancelled", "{reason}");
    let n = counters(&b.proxy).await;
    assert_eq!(
        (n["admitted"], n["cancelled"], n["completed"]),
        (2, 1, 1),
        "{n:?}"
    );
    assert!(
        s.daemon
            .log()
            .contains("D-Bus caller left the bus; its requests cancelled"),
        "{}",
        s.daemon.log()
    );

    // gdbus leaves the bus as soon as it has the reply: its request is cancelled too,
    // and the slot is free again for b.
    let o = run(gdbus_call(
        &s.bus,
        PATH,
        "org.gemmad.Gemmad1.Generate",
        &["{'prompt': <'hi'>, 'max_tokens': <uint32 30000>, 'ignore_eos': <true>}"],
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(REQUEST_PREFIX), "{}", text(&o));
    wait_counters(&b.proxy, "gdbus's request cancelled", |n| {
        n["cancelled"] == 2
    })
    .await;
    let t0 = Instant::now();
    loop {
        match b.generate(seeded("again", 2, 4)).await {
            Ok(p) => {
                b.until_end(p.as_str()).await;
                break;
            }
            Err(e) if named(&e).0 == BUSY && t0.elapsed() < HANG => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_get_named_errors() {
    let Some(s) = serve("bad_arguments_get_named_errors", "") else {
        return;
    };
    let a = caller(&s.bus).await;
    let p = &a.proxy;
    assert_error(
        p.generate(req(&[("prompt", "hi".into()), ("tempo", 1u32.into())]))
            .await,
        INVALID,
        "unknown key \"tempo\"",
    );
    assert_error(
        p.generate(req(&[("prompt", "hi".into()), ("max_tokens", 5i32.into())]))
            .await,
        INVALID,
        "max_tokens must be of type u, not i",
    );
    assert_error(
        p.generate(req(&[("max_tokens", 5u32.into())])).await,
        INVALID,
        "set prompt",
    );
    assert_error(
        p.generate(req(&[
            ("prompt", "hi".into()),
            ("priority", "urgent".into()),
        ]))
        .await,
        INVALID,
        "priority \"urgent\"",
    );
    // The core's own validation, as gRPC gets it.
    assert_error(
        p.generate(req(&[
            ("prompt", "hi".into()),
            ("max_tokens", 1_000_000u32.into()),
        ]))
        .await,
        INVALID,
        "max_tokens",
    );
    assert_error(
        p.tokenize_with(req(&[
            ("text", "a".into()),
            (
                "messages",
                Variant::from(Vec::<HashMap<&str, Variant<'_>>>::new()),
            ),
        ]))
        .await,
        INVALID,
        "one of them",
    );
    assert_error(p.load_modality("smell").await, INVALID, "\"smell\"");
    assert_error(
        p.load_modality("vision").await,
        NO_MODALITY,
        "no vision tower",
    );
    assert_error(p.governor_pin("saver").await, UNAVAILABLE, "governor");

    // The same through the command-line clients.
    let out = text(
        &run(gdbus_call(
            &s.bus,
            PATH,
            "org.gemmad.Gemmad1.Generate",
            &["{'prompt': <'hi'>, 'max_tokens': <8>}"],
        ))
        .await,
    );
    assert!(
        out.contains(&format!("{INVALID}: max_tokens must be of type u, not i")),
        "{out}"
    );
    let out = busctl_err(
        &s.bus,
        &[
            "call", DBUS_NAME, PATH, IFACE, "Generate", "a{sv}", "2", "prompt", "s", "hi", "tempo",
            "u", "1",
        ],
    )
    .await;
    assert!(out.contains("unknown key \"tempo\""), "{out}");
    let out = text(
        &run(gdbus_call(
            &s.bus,
            PATH,
            "org.gemmad.Gemmad1.LoadModality",
            &["vision"],
        ))
        .await,
    );
    assert!(out.contains(NO_MODALITY), "{out}");

    // Nothing was queued, and the service still generates.
    let n = counters(p).await;
    assert_eq!((n["admitted"], n["failed"]), (0, 0), "{n:?}");
    let mut a = a;
    let path = a.generate(seeded("hi", 1, 4)).await.unwrap();
    a.until_end(path.as_str()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_busy_with_a_retry_hint() {
    let Some(s) = serve(
        "a_full_queue_is_busy_with_a_retry_hint",
        "[queue]\ndepth = 1\nper_peer = 8\n",
    ) else {
        return;
    };
    let mut a = caller(&s.bus).await;
    let running = a.generate(long()).await.unwrap();
    a.first_token(running.as_str()).await;
    let waiting = a.generate(long()).await.unwrap();
    let e = a.generate(seeded("hi", 1, 4)).await.unwrap_err();
    let (name, msg) = named(&e);
    assert_eq!(name, BUSY, "{e:?}");
    assert!(msg.contains("retry after") && msg.contains(" ms"), "{msg}");
    let out = text(
        &run(gdbus_call(
            &s.bus,
            PATH,
            "org.gemmad.Gemmad1.Generate",
            &["{'prompt': <'hi'>}"],
        ))
        .await,
    );
    assert!(out.contains(BUSY), "{out}");
    let mut st = a.proxy.get_status().await.unwrap();
    let q = HashMap::<String, OwnedVariant>::try_from(st.remove("queue").unwrap()).unwrap();
    assert_eq!(u32::try_from(&*q["waiting"]).ok(), Some(1), "{q:?}");
    assert_eq!(bool::try_from(&*q["running"]).ok(), Some(true), "{q:?}");

    for p in [&waiting, &running] {
        a.request(p.as_str()).await.cancel().await.unwrap();
    }
    let t0 = Instant::now();
    let path = loop {
        match a.generate(seeded("hi", 1, 4)).await {
            Ok(p) => break p,
            Err(e) if named(&e).0 == BUSY && t0.elapsed() < HANG => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    let (_, _, reason, _) = a.until_end(path.as_str()).await;
    assert_ne!(reason, "cancelled");
    let n = counters(&a.proxy).await;
    assert!(n["rejected"] >= 2, "{n:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_changes_are_signalled() {
    let fixture = PathBuf::from(gemmad_e2e::MATFORMER_FIXTURE);
    let csv = fixture.join("slices.csv");
    let config = format!(
        "max_context = 4096\nmatformer_config = {:?}\nslice = \"layer-mix\"\n",
        csv.display().to_string()
    );
    let Some(s) = serve_on("property_changes_are_signalled", &fixture, &config, false) else {
        return;
    };
    let mut a = caller(&s.bus).await;
    let props = zbus::fdo::PropertiesProxy::builder(&a.conn)
        .destination(DBUS_NAME)
        .path(PATH)
        .build()
        .await
        .unwrap();
    let mut changes = props.receive_properties_changed().await.unwrap();
    assert_eq!(a.proxy.active_slice().await.unwrap(), "layer-mix");

    // Waits for the next PropertiesChanged of `prop`, which must have the value `want`.
    async fn changed(
        changes: &mut zbus::fdo::PropertiesChangedStream,
        prop: &str,
        want: &Variant<'_>,
    ) {
        loop {
            let sig = tokio::time::timeout(HANG, changes.next())
                .await
                .unwrap_or_else(|_| panic!("no PropertiesChanged of {prop} = {want:?}"))
                .expect("the stream ended");
            let args = sig.args().unwrap();
            assert_eq!(args.interface_name().as_str(), IFACE);
            if let Some(got) = args.changed_properties().get(prop) {
                assert_eq!(got, want, "{prop} changed to another value first");
                return;
            }
        }
    }

    let (name, layers, info) = a.proxy.set_slice("e2b-like", false).await.unwrap();
    assert_eq!((name.as_str(), layers), ("e2b-like", 10));
    assert_eq!(bool::try_from(&*info["active"]).ok(), Some(true));
    changed(&mut changes, "ActiveSlice", &Variant::from("e2b-like")).await;
    assert_eq!(a.proxy.active_slice().await.unwrap(), "e2b-like");
    let out = busctl_ok(
        &s.bus,
        &["get-property", DBUS_NAME, PATH, IFACE, "ActiveSlice"],
    )
    .await;
    assert_eq!(out.trim(), "s \"e2b-like\"");

    // A generation on that slice runs on it.
    let path = a.generate(seeded("hi", 3, 4)).await.unwrap();
    a.until_end(path.as_str()).await;
    assert_eq!(a.proxy.active_slice().await.unwrap(), "e2b-like");

    // QueueDepth goes 1 while a request runs, 0 after. First the published value is 0
    // again, and the changes signalled before it was read are dropped: the next change
    // of QueueDepth can only be the long request's.
    let t0 = Instant::now();
    while a.proxy.queue_depth().await.unwrap() != 0 {
        assert!(t0.elapsed() < HANG, "QueueDepth stays above 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, changes.next()).await {}
    let path = a.generate(long()).await.unwrap();
    a.first_token(path.as_str()).await;
    changed(&mut changes, "QueueDepth", &Variant::from(1u32)).await;
    a.request(path.as_str()).await.cancel().await.unwrap();
    changed(&mut changes, "QueueDepth", &Variant::from(0u32)).await;
    assert_eq!(a.proxy.queue_depth().await.unwrap(), 0);
    // What busctl reads is what was signalled.
    let out = busctl_ok(
        &s.bus,
        &["get-property", DBUS_NAME, PATH, IFACE, "QueueDepth"],
    )
    .await;
    assert_eq!(out.trim(), "u 0");
    let (name, _, _) = a.proxy.set_slice("full", false).await.unwrap();
    assert_eq!(name, "full");
    changed(&mut changes, "ActiveSlice", &Variant::from("full")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_signals_reach_only_their_caller() {
    let Some(s) = serve("request_signals_reach_only_their_caller", "") else {
        return;
    };
    // B listens to everything gemmad broadcasts, and to the request signals the way a
    // client of its own would; gdbus monitor watches every signal from the name.
    let b = s.bus.connect().await.unwrap();
    let everything = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(DBUS_NAME)
        .build()
        .unwrap();
    let mut b_all = MessageStream::for_match_rule(everything, &b, NonZeroUsize::new(10_000))
        .await
        .unwrap();
    let mut b_requests = MessageStream::for_match_rule(request_rule(), &b, None)
        .await
        .unwrap();
    let mut monitor = bus_gdbus(&s.bus, &["monitor", "--session", "--dest", DBUS_NAME]);
    let monitor_out = s.bus.dir().join("monitor.out");
    monitor
        .stdout(std::fs::File::create(&monitor_out).unwrap())
        .stderr(Stdio::null());
    let mut monitor = monitor.spawn().unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&monitor_out)
        .unwrap_or_default()
        .contains("is owned by")
    {
        assert!(t0.elapsed() < HANG, "gdbus monitor did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut a = caller(&s.bus).await;
    let path = a.generate(long()).await.unwrap();
    let mut tokens = a.first_token(path.as_str()).await.len();
    // B sees the broadcast QueueDepth change, so its subscription works...
    let t0 = Instant::now();
    loop {
        let m = tokio::time::timeout(HANG, b_all.next())
            .await
            .expect("B got no broadcast signal")
            .unwrap()
            .unwrap();
        let h = m.header();
        assert_ne!(
            h.interface().map(|i| i.as_str()),
            Some(REQUEST_IFACE),
            "B received A's request signal {:?}",
            h.member()
        );
        if h.member().map(|m| m.as_str()) == Some("PropertiesChanged") {
            let (_, changed, _): (String, HashMap<String, OwnedVariant>, Vec<String>) =
                m.body().deserialize().unwrap();
            if changed.contains_key("QueueDepth") {
                break;
            }
        }
        assert!(t0.elapsed() < HANG);
    }
    while tokens < 8 {
        if let Signal::Token(_, ids) = a.next(path.as_str()).await {
            tokens += ids.len();
        }
    }
    a.request(path.as_str()).await.cancel().await.unwrap();
    loop {
        if let Signal::Finished(r, _) = a.next(path.as_str()).await {
            assert_eq!(r, "cancelled");
            break;
        }
    }
    // ...and once a round trip to gemmad after A's Finished is back, anything gemmad had
    // sent B would be in B's queues: there is no request signal.
    Gemmad1Proxy::new(&b)
        .await
        .unwrap()
        .tokenize("x")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::ZERO, b_all.next()).await {
        let m = m.unwrap();
        assert_ne!(
            m.header().interface().map(|i| i.as_str()),
            Some(REQUEST_IFACE),
            "B received a request signal"
        );
    }
    assert!(
        tokio::time::timeout(Duration::ZERO, b_requests.next())
            .await
            .is_err(),
        "B's request-signal subscription received A's signal"
    );
    let _ = monitor.kill();
    let _ = monitor.wait();
    let seen = std::fs::read_to_string(&monitor_out).unwrap();
    assert!(seen.contains("PropertiesChanged"), "{seen}");
    for member in ["Request.Token", "Request.Finished"] {
        assert!(
            !seen.contains(member),
            "gdbus monitor saw {member}:\n{seen}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_outside_the_access_list_are_refused() {
    let Some(s) = serve(
        "callers_outside_the_access_list_are_refused",
        "[access]\nallowed_uids = [4242]\nallowed_groups = []\n",
    ) else {
        return;
    };
    // This process's uid is not in the list (an explicit list replaces root).
    assert_ne!(nix::unistd::Uid::effective().as_raw(), 4242);
    let a = caller(&s.bus).await;
    let p = &a.proxy;
    assert_error(
        p.generate(seeded("hi", 1, 4)).await,
        DENIED,
        "may not use gemmad",
    );
    assert_error(p.tokenize("hi").await, DENIED, "may not use gemmad");
    assert_error(p.get_status().await, DENIED, "may not use gemmad");
    let out = text(
        &run(gdbus_call(
            &s.bus,
            PATH,
            "org.gemmad.Gemmad1.GetStatus",
            &[],
        ))
        .await,
    );
    assert!(out.contains(DENIED), "{out}");
    // Properties and introspection are public (docs/dbus.md).
    assert_eq!(p.version().await.unwrap(), env!("CARGO_PKG_VERSION"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_is_refused_or_allowed_by_the_list_and_may_not_pin() {
    let test = "another_uid_is_refused_or_allowed_by_the_list_and_may_not_pin";
    if !can_switch_uid(test) {
        return;
    }
    // Default access list (root only): uid 65534 gets PermissionDenied from gemmad.
    let Some(s) = serve_on(test, Path::new(gemmad_e2e::FIXTURE), "", true) else {
        return;
    };
    let mut c = as_other_uid(&s.bus, "busctl");
    c.args(["--address", s.bus.address(), "call", DBUS_NAME, PATH, IFACE])
        .args(["Tokenize", "s", "hello"]);
    let o = run(c).await;
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("uid={OTHER_UID}")),
        "{}",
        text(&o)
    );
    let mut c = as_other_uid(&s.bus, "gdbus");
    c.args(["call", "--address", s.bus.address(), "--dest", DBUS_NAME])
        .args([
            "--object-path",
            PATH,
            "--method",
            "org.gemmad.Gemmad1.Generate",
        ])
        .arg("{'prompt': <'hi'>}");
    let o = run(c).await;
    assert!(text(&o).contains(DENIED), "{}", text(&o));
    let root = caller(&s.bus).await;
    assert!(!root.proxy.tokenize("hello").await.unwrap().is_empty());
    drop(root);
    drop(s);

    // Allowed by uid, but not an admin: GovernorPin is PermissionDenied, while root's
    // is Unavailable (the governor is off).
    let Some(s) = serve_on(
        test,
        Path::new(gemmad_e2e::FIXTURE),
        &format!("[access]\nallowed_uids = [0, {OTHER_UID}]\n"),
        true,
    ) else {
        return;
    };
    let mut c = as_other_uid(&s.bus, "busctl");
    c.args(["--address", s.bus.address(), "call", DBUS_NAME, PATH, IFACE])
        .args(["Tokenize", "s", "hello"]);
    let o = run(c).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("au "),
        "{}",
        text(&o)
    );
    let mut c = as_other_uid(&s.bus, "gdbus");
    c.args(["call", "--address", s.bus.address(), "--dest", DBUS_NAME])
        .args([
            "--object-path",
            PATH,
            "--method",
            "org.gemmad.Gemmad1.GovernorPin",
        ])
        .arg("saver");
    let o = run(c).await;
    let out = text(&o);
    assert!(
        out.contains(&format!("{DENIED}: ")) && out.contains("may not pin the governor"),
        "{out}"
    );
    // Nor may it stop the daemon, which goes on serving.
    let mut c = as_other_uid(&s.bus, "gdbus");
    c.args(["call", "--address", s.bus.address(), "--dest", DBUS_NAME])
        .args([
            "--object-path",
            PATH,
            "--method",
            "org.gemmad.Gemmad1.Shutdown",
        ]);
    let o = run(c).await;
    let out = text(&o);
    assert!(
        out.contains(&format!("{DENIED}: ")) && out.contains("may not stop gemmad"),
        "{out}"
    );
    let root = caller(&s.bus).await;
    assert_error(
        root.proxy.governor_pin("saver").await,
        UNAVAILABLE,
        "not running",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_keeps_serving_while_dbus_clients_misbehave() {
    let Some(s) = serve(
        "grpc_keeps_serving_while_dbus_clients_misbehave",
        "[queue]\nper_peer = 64\n",
    ) else {
        return;
    };
    let mut g = s.daemon.client().await.unwrap();
    let want = g.generate_text(grpc_seeded("steady", 5, 24)).await.unwrap();
    let mut during_req = grpc_seeded("during", 9, 200);
    during_req.ignore_eos = true;
    let mut during = g.generate(during_req).await.unwrap();

    // The flood: bad requests on 4 connections, 10 callers that leave mid-request, and
    // gdbus calls with bad arguments.
    let mut tasks = Vec::new();
    for i in 0..4u32 {
        let conn = s.bus.connect().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let p = Gemmad1Proxy::new(&conn).await.unwrap();
            for j in 0..25u32 {
                let e = p
                    .generate(req(&[("prompt", "x".into()), ("bogus", (i * j).into())]))
                    .await
                    .unwrap_err();
                assert_eq!(named(&e).0, INVALID);
            }
        }));
    }
    for _ in 0..10 {
        let conn = s.bus.connect().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let p = Gemmad1Proxy::new(&conn).await.unwrap();
            p.generate(long()).await.unwrap();
            // Leaves with its request queued or running.
            drop(p);
            drop(conn);
        }));
    }
    let mut gdbus = Vec::new();
    for _ in 0..4 {
        gdbus.push(tokio::spawn(run(gdbus_call(
            &s.bus,
            PATH,
            "org.gemmad.Gemmad1.Generate",
            &["{'prompt': <'hi'>, 'seed': <-1>}"],
        ))));
    }
    // gRPC answers while the flood runs.
    let mut served = 0;
    let t0 = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) {
        assert!(t0.elapsed() < HANG, "the flood's calls did not end");
        g.status().await.expect("Status during the flood");
        served += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(served >= 1);
    for t in tasks {
        t.await.expect("a flood task failed");
    }
    for t in gdbus {
        let out = text(&t.await.unwrap());
        assert!(out.contains(INVALID), "{out}");
    }
    // The stream that ran through it all completes.
    let mut completion = 0;
    let fin = loop {
        let m = tokio::time::timeout(HANG, during.message())
            .await
            .expect("the gRPC stream stalled")
            .expect("the gRPC stream failed")
            .expect("the gRPC stream ended without Finished");
        match m.event {
            Some(pb::generate_response::Event::Delta(d)) => completion += d.token_ids.len(),
            Some(pb::generate_response::Event::Finished(f)) => break f,
            _ => {}
        }
    };
    assert_eq!(completion, 200);
    assert_eq!(
        gemmad_client::finish_reason_str(fin.finish_reason),
        "length"
    );
    // Every leaver's request was cancelled (none runs on for a caller that left)...
    let t0 = Instant::now();
    loop {
        let st = g.status().await.unwrap();
        let (n, q) = (st.requests.unwrap(), st.queue.unwrap());
        if n.cancelled == 10 && !q.running && q.waiting == 0 {
            break;
        }
        assert!(t0.elapsed() < HANG, "the leavers' requests: {n:?} {q:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and gRPC gives the same text as before.
    let again = tokio::time::timeout(HANG, g.generate_text(grpc_seeded("steady", 5, 24)))
        .await
        .expect("the gRPC generation after the flood stalled")
        .unwrap();
    assert_eq!(again.text, want.text);
    let n = g.status().await.unwrap().requests.unwrap();
    assert_eq!(
        (n.admitted, n.completed, n.cancelled, n.failed),
        (13, 3, 10, 0),
        "{n:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_the_text_does_not_cost_gemmad_its_bus_name() {
    let Some(s) = serve("a_nul_in_the_text_does_not_cost_gemmad_its_bus_name", "") else {
        return;
    };
    // The byte token <0x00> detokenizes to U+0000, which no D-Bus string may hold: a bus
    // disconnects a peer that sends one.
    let tok: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(gemmad_e2e::FIXTURE).join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let nul = tok["model"]["vocab"]
        .as_array()
        .and_then(|v| v.iter().position(|e| e[0] == "<0x00>"))
        .or_else(|| tok["model"]["vocab"]["<0x00>"].as_u64().map(|i| i as usize))
        .expect("the fixture's vocabulary has <0x00>") as u32;
    let mut g = s.daemon.client().await.unwrap();
    let ids = g.tokenize("ab", false).await.unwrap().ids;
    let ids = [ids.clone(), vec![nul], ids].concat();
    let grpc = g.detokenize(ids.clone()).await.unwrap();
    assert!(grpc.contains('\0'), "{grpc:?}");

    let a = caller(&s.bus).await;
    let text = a.proxy.detokenize(&ids).await.expect("Detokenize");
    assert_eq!(text, grpc.replace('\0', "\u{FFFD}"));
    // gemmad is still on the bus, and answers.
    s.bus.wait_name_owner(DBUS_NAME).await.unwrap();
    let dbus = zbus::fdo::DBusProxy::new(&a.conn).await.unwrap();
    assert!(dbus
        .name_has_owner(DBUS_NAME.try_into().unwrap())
        .await
        .unwrap());
    let out = busctl_ok(
        &s.bus,
        &[
            "call",
            DBUS_NAME,
            PATH,
            IFACE,
            "Detokenize",
            "au",
            "1",
            &nul.to_string(),
        ],
    )
    .await;
    // busctl prints non-ASCII bytes as octal escapes: U+FFFD is EF BF BD.
    assert_eq!(out.trim(), r#"s "\357\277\275""#);
    assert!(!a.proxy.tokenize("still here").await.unwrap().is_empty());
}

/// A system bus's default-deny policy (Debian's system.conf, less what a test bus cannot
/// have: a bus user, a pid file, the service helper), plus `extra`.
fn system_like_bus(extra: &str) -> PrivateBus {
    PrivateBus::with_config(&format!(
        r#"<type>system</type>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
  </policy>
  {extra}"#
    ))
    .expect("starting a system-like dbus-daemon")
}

/// `systemd/<file>` of this repository.
fn packaged(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_bus_policy_lets_gemmad_own_the_name_and_members_call() {
    let test = "the_system_bus_policy_lets_gemmad_own_the_name_and_members_call";
    if !gemmad_e2e::dbus_tools_or_skip(test) || !can_switch_uid(test) {
        return;
    }
    // Our policy and activation file, with the gemmad user and group replaced by root
    // (this test's daemon) and nogroup (uid 65534's group); uid 1 (daemon) is in
    // neither.
    let files = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        files.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let policy = std::fs::read_to_string(packaged("org.gemmad.Gemmad1.conf")).unwrap();
    assert!(policy.contains("<policy user=\"gemmad\">") && policy.contains("group=\"gemmad\""));
    let policy = policy
        .replace("user=\"gemmad\"", "user=\"root\"")
        .replace("group=\"gemmad\"", "group=\"nogroup\"");
    let policy_path = files.path().join("org.gemmad.Gemmad1.conf");
    std::fs::write(&policy_path, policy).unwrap();
    let services = files.path().join("services");
    std::fs::create_dir(&services).unwrap();
    std::fs::copy(
        packaged("org.gemmad.Gemmad1.service"),
        services.join("org.gemmad.Gemmad1.service"),
    )
    .unwrap();

    // Without the policy file, the system bus lets no one own the name, and an explicit
    // --dbus system stops gemmad with the reason.
    {
        let bus = system_like_bus("");
        let mut d = Daemon::builder()
            .config("[model]\nthreads = 1\n")
            .dbus_system(&bus)
            .spawn()
            .unwrap();
        let st = d.wait_exit().await.unwrap();
        assert!(!st.success());
        let log = d.log();
        assert!(
            log.contains("cannot serve org.gemmad.Gemmad1 on the system bus")
                && log.contains("not allowed to own"),
            "{log}"
        );
    }

    let bus = system_like_bus(&format!(
        "<servicedir>{}</servicedir>\n  <include>{}</include>",
        services.display(),
        policy_path.display()
    ));
    let d = Daemon::builder()
        .config("[model]\nthreads = 1\n[access]\nallowed_uids = [0, 1, 65534]\n")
        .dbus_system(&bus)
        .start()
        .expect("gemmad owns the name under the packaged policy");

    // The activation file parses and names the service.
    let out = busctl_ok(
        &bus,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "ListActivatableNames",
        ],
    )
    .await;
    assert!(out.contains("\"org.gemmad.Gemmad1\""), "{out}");

    let as_uid = |uid: u32, program: &str| {
        let mut c = bus.command("/usr/bin/setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "--", program]);
        c
    };
    let busctl = |uid: u32, args: &[&str]| {
        let mut c = as_uid(uid, "busctl");
        c.args(["--address", bus.address()]).args(args);
        c
    };
    let tokenize = ["call", DBUS_NAME, PATH, IFACE, "Tokenize", "s", "hello"];
    let version = ["get-property", DBUS_NAME, PATH, IFACE, "Version"];
    // root and a member of the group may call; everyone may read properties and
    // introspect; a non-member's call is refused by the bus.
    for (uid, may_call) in [(0, true), (65534, true), (1, false)] {
        let o = run(busctl(uid, &tokenize)).await;
        assert_eq!(o.status.success(), may_call, "uid {uid}: {}", text(&o));
        if !may_call {
            assert!(text(&o).contains("Access denied"), "{}", text(&o));
        }
        let o = run(busctl(uid, &version)).await;
        assert!(o.status.success(), "uid {uid}: {}", text(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            format!("s {:?}", env!("CARGO_PKG_VERSION"))
        );
        let o = run(busctl(uid, &["introspect", DBUS_NAME, PATH])).await;
        assert!(
            o.status.success() && text(&o).contains(".Generate"),
            "uid {uid}: {}",
            text(&o)
        );
        let mut c = as_uid(uid, "gdbus");
        c.args(["call", "--address", bus.address(), "--dest", DBUS_NAME])
            .args(["--object-path", PATH])
            .args(["--method", "org.freedesktop.DBus.Peer.Ping"]);
        let o = run(c).await;
        assert!(o.status.success(), "uid {uid}: {}", text(&o));
    }
    let mut c = as_uid(1, "gdbus");
    c.args(["call", "--address", bus.address(), "--dest", DBUS_NAME])
        .args([
            "--object-path",
            PATH,
            "--method",
            "org.gemmad.Gemmad1.GetStatus",
        ]);
    assert!(text(&run(c).await).contains(ACCESS_DENIED));
    // Only gemmad's user may own the name.
    let mut c = as_uid(65534, "gdbus");
    c.args([
        "call",
        "--address",
        bus.address(),
        "--dest",
        "org.freedesktop.DBus",
    ])
    .args(["--object-path", "/org/freedesktop/DBus"])
    .args([
        "--method",
        "org.freedesktop.DBus.RequestName",
        DBUS_NAME,
        "4",
    ]);
    let out = text(&run(c).await);
    assert!(
        out.contains(ACCESS_DENIED) && out.contains("not allowed to own"),
        "{out}"
    );

    // Request signals reach their caller through the default-deny policy (root, zbus).
    let mut a = caller(&bus).await;
    let path = a.generate(seeded("hi", 1, 4)).await.unwrap();
    let (_, ids, _, usage) = a.until_end(path.as_str()).await;
    assert_eq!(usage["completion_tokens"], ids.len() as u64);
    drop(d);
}

/// `gemmactl --dbus ADDRESS` against the real daemon: every subcommand it has runs over
/// D-Bus and prints what it prints over the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemmactl_over_dbus_matches_the_socket() {
    let Some(s) = serve_on(
        "gemmactl_over_dbus_matches_the_socket",
        Path::new(gemmad_e2e::MATFORMER_FIXTURE),
        &format!(
            "[model]\nmatformer_config = \"{}/slices.csv\"\n",
            gemmad_e2e::MATFORMER_FIXTURE
        ),
        false,
    ) else {
        return;
    };
    let over = |via_dbus: bool, args: &[&str]| {
        let mut c = s.daemon.gemmactl().unwrap();
        if via_dbus {
            c.arg("--dbus").arg(s.bus.address());
        }
        c.args(args);
        c
    };
    for args in [
        &[
            "generate",
            "--seed",
            "7",
            "--max-tokens",
            "12",
            "Hello there",
        ][..],
        &["tokenize", "Hello there"],
        &["detokenize", "27", "41", "99"],
        &["slices", "--json"],
        &["health"],
    ] {
        let by_socket = run(over(false, args)).await;
        let by_dbus = run(over(true, args)).await;
        assert!(by_socket.status.success(), "{args:?}: {}", text(&by_socket));
        assert!(
            by_dbus.status.success(),
            "{args:?} over D-Bus: {}",
            text(&by_dbus)
        );
        assert_eq!(
            String::from_utf8_lossy(&by_dbus.stdout),
            String::from_utf8_lossy(&by_socket.stdout),
            "{args:?}"
        );
    }
    // A switch over D-Bus shows in the socket's status, and the other way round.
    let set = run(over(true, &["set-slice", "e2b-like"])).await;
    assert!(set.status.success(), "{}", text(&set));
    let st = run(over(false, &["status", "--json"])).await;
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["active_slice"], "e2b-like", "{st}");
    let st = run(over(true, &["status", "--json"])).await;
    assert!(st.status.success(), "{}", text(&st));
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["active_slice"], "e2b-like", "{st}");
    // Errors keep their kind: an unknown slice is an invalid argument either way.
    let bad_socket = run(over(false, &["set-slice", "nope"])).await;
    let bad_dbus = run(over(true, &["set-slice", "nope"])).await;
    assert!(!bad_dbus.status.success());
    assert_eq!(bad_dbus.status.code(), bad_socket.status.code());
}

// ---------------------------------------------------------------- The prompt cache

/// gemmad-client's D-Bus transport on the test's bus.
async fn dbus_client(bus: &PrivateBus) -> DbusClient {
    DbusClient::connect(Bus::Address(bus.address().to_string()))
        .await
        .expect("DbusClient on the test's bus")
}

fn turn(role: &str, t: &str) -> pb::Message {
    message(role, vec![text_part(t)])
}

/// A seeded conversation; `cache` is sent as `cache_prompt` when set.
fn chat(
    messages: Vec<pb::Message>,
    seed: u64,
    max_tokens: u32,
    cache: Option<bool>,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages,
        sampling: Some(pb::Sampling {
            seed: Some(seed),
            ..Default::default()
        }),
        max_tokens,
        cache_prompt: cache,
        ..Default::default()
    }
}

fn usage_of(g: &Generation) -> pb::Usage {
    g.finished
        .as_ref()
        .and_then(|f| f.usage)
        .expect("a Finished with usage")
}

/// The request's Finished dict as sent (its Tokens skipped).
async fn finished_dict(c: &mut Caller, path: &str) -> HashMap<String, OwnedVariant> {
    loop {
        match c.next(path).await {
            Signal::Token(..) => continue,
            Signal::Finished(_, u) => return u,
            Signal::Failed(n, m) => panic!("request {path} failed: {n}: {m}"),
        }
    }
}

/// `cached_tokens` of a Finished dict, checked to be a `u`.
fn cached_tokens(u: &HashMap<String, OwnedVariant>) -> u32 {
    match u.get("cached_tokens").map(|v| &**v) {
        Some(Variant::U32(n)) => *n,
        other => panic!("Finished has no cached_tokens of type u: {other:?} in {u:?}"),
    }
}

/// A string entry of a reply dict.
fn str_entry(d: &HashMap<String, OwnedVariant>, key: &str) -> String {
    match d.get(key).map(|v| &**v) {
        Some(Variant::Str(s)) => s.as_str().to_string(),
        other => panic!("no {key} of type s: {other:?} in {d:?}"),
    }
}

/// The keys of GetStatus's `prompt_cache.pinned`, as `p` sees them.
async fn pinned_keys(p: &Gemmad1Proxy<'_>) -> Vec<String> {
    let s = p.get_status().await.expect("GetStatus");
    let pc = s.get("prompt_cache").expect("GetStatus has prompt_cache");
    assert_eq!(pc.value_signature().to_string(), "a{sv}");
    let pc = HashMap::<String, OwnedVariant>::try_from(pc.clone()).unwrap();
    let pinned = pc.get("pinned").expect("prompt_cache has pinned").clone();
    assert_eq!(pinned.value_signature().to_string(), "aa{sv}");
    Vec::<HashMap<String, OwnedVariant>>::try_from(pinned)
        .unwrap()
        .iter()
        .map(|d| str_entry(d, "key"))
        .collect()
}

fn is_key(k: &str) -> bool {
    k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversations_next_turn_resumes_from_the_prompt_cache() {
    let Some(s) = serve(
        "a_conversations_next_turn_resumes_from_the_prompt_cache",
        "",
    ) else {
        return;
    };
    // On the wire: Finished carries cached_tokens (u); the same prompt again resumes all
    // but its last token; cache_prompt=false prefills from zero.
    let mut a = caller(&s.bus).await;
    let q = "Tell me about the sea and the ships that sail on it.";
    let asked = |cache: Option<bool>| {
        let mut r = req(&[
            ("prompt", q.into()),
            ("seed", 5u64.into()),
            ("max_tokens", 4u32.into()),
        ]);
        if let Some(c) = cache {
            r.insert("cache_prompt", c.into());
        }
        r
    };
    let path = a.generate(asked(None)).await.unwrap();
    let u = finished_dict(&mut a, path.as_str()).await;
    assert_eq!(cached_tokens(&u), 0, "nothing kept yet: {u:?}");
    let prompt = numbers(u)["prompt_tokens"];
    let path = a.generate(asked(Some(true))).await.unwrap();
    let u = finished_dict(&mut a, path.as_str()).await;
    assert_eq!(
        u64::from(cached_tokens(&u)),
        prompt - 1,
        "the prompt again: {u:?}"
    );
    let path = a.generate(asked(Some(false))).await.unwrap();
    let u = finished_dict(&mut a, path.as_str()).await;
    assert_eq!(cached_tokens(&u), 0, "cache_prompt=false: {u:?}");

    // Through gemmad-client's D-Bus transport: the second turn of a conversation resumes
    // at least the first turn's prompt (its last token may tokenize differently before
    // the answer), gives the same tokens as with the cache off, and Status counts it.
    let c = dbus_client(&s.bus).await;
    let first = vec![turn("user", "Which birds follow the fishing boats home?")];
    let one = c
        .generate_text(chat(first.clone(), 1, 12, None))
        .await
        .unwrap();
    let u1 = usage_of(&one);
    assert_eq!(u1.cached_tokens, 0, "another prompt: {u1:?}");
    let mut second = first;
    second.push(turn("model", &one.text));
    second.push(turn("user", "And where do they sleep?"));
    let two = c
        .generate_text(chat(second.clone(), 2, 8, None))
        .await
        .unwrap();
    let u2 = usage_of(&two);
    assert!(
        u2.cached_tokens > 0 && u2.cached_tokens + 1 >= u1.prompt_tokens,
        "second turn {u2:?} after a first of {u1:?}"
    );
    assert!(u2.cached_tokens < u2.prompt_tokens, "{u2:?}");
    let cold = c
        .generate_text(chat(second, 2, 8, Some(false)))
        .await
        .unwrap();
    let u3 = usage_of(&cold);
    assert_eq!(u3.cached_tokens, 0, "cache_prompt=false: {u3:?}");
    assert_eq!(u3.prompt_tokens, u2.prompt_tokens);
    assert_eq!(cold.token_ids, two.token_ids, "the cache changes no output");
    assert_eq!(cold.text, two.text);

    let pc = c
        .status()
        .await
        .unwrap()
        .prompt_cache
        .expect("GetStatus has prompt_cache");
    assert!(pc.enabled, "{pc:?}");
    assert!(pc.hits >= 2, "{pc:?}");
    assert!(
        pc.reused_tokens >= prompt - 1 + u64::from(u2.cached_tokens),
        "{pc:?}"
    );
    assert!(pc.ram_budget > 0 && pc.pinned.is_empty(), "{pc:?}");
}

/// Long enough that its pinned state is more than the 8 tokens a request may fall short
/// of at the boundary.
const SYSTEM: &str = "You are a careful assistant for sailors. Answer in short sentences, \
                      name the charts you rely on, and say so when you do not know.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_system_prompt_is_listed_resumed_and_dropped() {
    let Some(s) = serve("a_pinned_system_prompt_is_listed_resumed_and_dropped", "") else {
        return;
    };
    let mut c = dbus_client(&s.bus).await;
    let p = c
        .cache_prompt(pb::CachePromptRequest {
            messages: vec![turn("system", SYSTEM)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(is_key(&p.key), "{p:?}");
    assert!(p.tokens > 8, "{p:?}");
    assert!(!p.shared && !p.on_disk, "{p:?}");
    assert_eq!(p.uid, Some(nix::unistd::Uid::effective().as_raw()), "{p:?}");
    assert!(p.ram_bytes > 0 && !p.slice.is_empty(), "{p:?}");

    let pc = c.status().await.unwrap().prompt_cache.unwrap();
    assert_eq!(pc.pinned, std::slice::from_ref(&p), "{pc:?}");
    assert!(pc.entries >= 1 && pc.ram_bytes >= p.ram_bytes, "{pc:?}");

    // A conversation that starts with the system prompt resumes it.
    let g = c
        .generate_text(chat(
            vec![
                turn("system", SYSTEM),
                turn("user", "Where is the nearest harbour?"),
            ],
            3,
            6,
            None,
        ))
        .await
        .unwrap();
    let u = usage_of(&g);
    assert!(
        u.cached_tokens + 8 >= p.tokens && u.cached_tokens < u.prompt_tokens,
        "{u:?} after pinning {} tokens",
        p.tokens
    );

    // Dropped by key: gone from Status; a second drop has nothing to drop.
    c.drop_cached_prompt(&p.key).await.unwrap();
    let pc = c.status().await.unwrap().prompt_cache.unwrap();
    assert!(pc.pinned.is_empty(), "{pc:?}");
    let e = c.drop_cached_prompt(&p.key).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    let a = caller(&s.bus).await;
    assert_error(
        a.proxy.drop_cached_prompt(&p.key).await,
        INVALID,
        "no cached prompt",
    );

    // `ids`, straight on the bus: the reply's types are docs/dbus.md's; "" drops all.
    let ids = a.proxy.tokenize("the sea and the ships").await.unwrap();
    assert!(ids.len() >= 2, "{ids:?}");
    let r = a
        .proxy
        .cache_prompt(req(&[("ids", ids.clone().into())]))
        .await
        .unwrap();
    let types: HashMap<&str, String> = r
        .iter()
        .map(|(k, v)| (k.as_str(), v.value_signature().to_string()))
        .collect();
    let want: HashMap<&str, String> = [
        ("key", "s"),
        ("tokens", "u"),
        ("shared", "b"),
        ("uid", "u"),
        ("slice", "s"),
        ("ram_bytes", "t"),
        ("on_disk", "b"),
    ]
    .into_iter()
    .map(|(k, t)| (k, t.to_string()))
    .collect();
    assert_eq!(types, want, "{r:?}");
    assert_eq!(numbers(r.clone())["tokens"], ids.len() as u64);
    let ids_key = str_entry(&r, "key");
    assert!(is_key(&ids_key) && ids_key != p.key, "{ids_key}");
    let again = c
        .cache_prompt(pb::CachePromptRequest {
            messages: vec![turn("system", SYSTEM)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(again.key, p.key, "the same prompt, the same key");
    let mut keys = pinned_keys(&a.proxy).await;
    keys.sort();
    let mut want = vec![p.key.clone(), ids_key];
    want.sort();
    assert_eq!(keys, want);
    a.proxy.drop_cached_prompt("").await.unwrap();
    assert!(pinned_keys(&a.proxy).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_a_cached_prompt_takes_an_admin() {
    let test = "sharing_a_cached_prompt_takes_an_admin";
    if !can_switch_uid(test) {
        return;
    }
    let Some(s) = serve_on(
        test,
        Path::new(gemmad_e2e::FIXTURE),
        &format!("[access]\nallowed_uids = [0, {OTHER_UID}]\n"),
        true,
    ) else {
        return;
    };
    // A gdbus call of `method` as the other uid (allowed, not an admin).
    let other = |method: &str, args: &[&str]| {
        let mut c = as_other_uid(&s.bus, "gdbus");
        c.args(["call", "--address", s.bus.address(), "--dest", DBUS_NAME])
            .args(["--object-path", PATH, "--method"])
            .arg(format!("{IFACE}.{method}"))
            .args(args);
        c
    };
    let o = run(other(
        "CachePrompt",
        &["{'ids': <[uint32 2, 105, 7, 8]>, 'shared': <true>}"],
    ))
    .await;
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains(&format!("{DENIED}: ")) && out.contains("may not share a cached prompt"),
        "{out}"
    );
    // Its own: owned by its uid.
    let o = run(other("CachePrompt", &["{'ids': <[uint32 2, 105, 7, 8]>}"])).await;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        out.contains(&format!("'uid': <uint32 {OTHER_UID}>")) && out.contains("'shared': <false>"),
        "{out}"
    );
    let at = out.find("'key': <'").expect("a key in the reply") + "'key': <'".len();
    let its_key = out[at..at + 16].to_string();
    assert!(is_key(&its_key), "{out}");

    // root is an admin: it may share (no uid in the reply), and it keeps one of its own.
    let root = caller(&s.bus).await;
    let shared = root
        .proxy
        .cache_prompt(req(&[
            ("ids", vec![2u32, 105, 9, 10].into()),
            ("shared", true.into()),
        ]))
        .await
        .unwrap();
    assert_eq!(&*shared["shared"], &Variant::from(true), "{shared:?}");
    assert!(!shared.contains_key("uid"), "{shared:?}");
    let shared_key = str_entry(&shared, "key");
    let own = root
        .proxy
        .cache_prompt(req(&[("ids", vec![2u32, 105, 11, 12].into())]))
        .await
        .unwrap();
    assert_eq!(&*own["uid"], &Variant::from(0u32), "{own:?}");
    let root_key = str_entry(&own, "key");

    // The other uid sees its own and the shared one, not root's; root sees all three.
    let o = run(other("GetStatus", &[])).await;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&its_key) && out.contains(&shared_key) && !out.contains(&root_key),
        "{out}"
    );
    let mut keys = pinned_keys(&root.proxy).await;
    keys.sort();
    let mut want = vec![its_key.clone(), shared_key.clone(), root_key.clone()];
    want.sort();
    assert_eq!(keys, want);
    // It may not drop root's, nor the shared one; it may drop its own.
    for key in [&root_key, &shared_key] {
        let out = text(&run(other("DropCachedPrompt", &[key.as_str()])).await);
        assert!(
            out.contains(&format!("{INVALID}: ")) && out.contains("no cached prompt"),
            "{out}"
        );
    }
    let o = run(other("DropCachedPrompt", &[its_key.as_str()])).await;
    assert!(o.status.success(), "{}", text(&o));
    let mut keys = pinned_keys(&root.proxy).await;
    keys.sort();
    let mut want = vec![shared_key, root_key];
    want.sort();
    assert_eq!(keys, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_prompt_bad_arguments_are_invalid_and_gemmad_serves_on() {
    let Some(s) = serve(
        "cache_prompt_bad_arguments_are_invalid_and_gemmad_serves_on",
        "",
    ) else {
        return;
    };
    let mut a = caller(&s.bus).await;
    let system = || {
        let m: HashMap<&str, Variant<'_>> =
            HashMap::from([("role", "system".into()), ("content", "Be brief.".into())]);
        Variant::from(vec![m])
    };
    let none: HashMap<&str, Variant<'_>> = HashMap::new();
    for (args, part) in [
        (
            req(&[("messages", system()), ("ids", vec![2u32, 105].into())]),
            "set messages or ids, not both",
        ),
        (none, "set messages (aa{sv}) or ids (au)"),
        (
            req(&[("ids", vec![2u32, 105].into()), ("keep", true.into())]),
            "unknown key \"keep\"",
        ),
        (
            req(&[("ids", vec!["2".to_string()].into())]),
            "ids must be of type au, not as",
        ),
        (
            req(&[("ids", vec![2u32, 105].into()), ("shared", 1u32.into())]),
            "shared must be of type b, not u",
        ),
        (
            req(&[("ids", vec![2u32, 105].into()), ("persist", "yes".into())]),
            "persist must be of type b, not s",
        ),
        (
            req(&[("messages", "hi".into())]),
            "messages must be of type aa{sv}, not s",
        ),
        // The core's and the engine's own checks, as gRPC gets them.
        (
            req(&[("ids", vec![2u32, 100_000].into())]),
            "outside the vocabulary",
        ),
        (req(&[("ids", vec![2u32].into())]), "at least 2 tokens"),
    ] {
        assert_error(a.proxy.cache_prompt(args).await, INVALID, part);
    }
    assert_error(
        a.proxy.drop_cached_prompt("nope").await,
        INVALID,
        "16 hex digits",
    );
    assert_error(
        a.proxy.drop_cached_prompt("0123456789abcdef").await,
        INVALID,
        "no cached prompt",
    );
    assert_error(
        a.generate(req(&[
            ("prompt", "hi".into()),
            ("cache_prompt", 1u32.into()),
        ]))
        .await,
        INVALID,
        "cache_prompt must be of type b, not u",
    );
    let out = busctl_err(
        &s.bus,
        &[
            "call",
            DBUS_NAME,
            PATH,
            IFACE,
            "CachePrompt",
            "a{sv}",
            "1",
            "ids",
            "s",
            "x",
        ],
    )
    .await;
    assert!(out.contains("ids must be of type au, not s"), "{out}");

    // Nothing was pinned, and gemmad serves on: a generation, a pin, a drop.
    assert!(pinned_keys(&a.proxy).await.is_empty());
    let path = a.generate(seeded("hi", 1, 4)).await.unwrap();
    let (_, ids, reason, usage) = a.until_end(path.as_str()).await;
    assert!(!ids.is_empty() && reason != "cancelled", "{reason}");
    assert_eq!(usage["completion_tokens"], ids.len() as u64);
    let r = a
        .proxy
        .cache_prompt(req(&[("ids", vec![2u32, 105, 7].into())]))
        .await
        .unwrap();
    let key = str_entry(&r, "key");
    assert_eq!(pinned_keys(&a.proxy).await, std::slice::from_ref(&key));
    a.proxy.drop_cached_prompt(&key).await.unwrap();
    assert!(pinned_keys(&a.proxy).await.is_empty());
    let n = counters(&a.proxy).await;
    assert_eq!((n["admitted"], n["completed"]), (1, 1), "{n:?}");
}
