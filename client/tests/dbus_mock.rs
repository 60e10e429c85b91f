//! DbusClient against a stand-in gemmad on a private dbus-daemon: the signal subscription,
//! the order of reply and signals, errors, cancelling, and gemmad leaving mid-generation.
//! The stand-in follows docs/dbus.md; it is no substitute for tests against gemmad itself.
//! Skipped where `dbus-daemon` is not installed.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gemmad_client::dbus::{Bus, DbusClient, BUS_NAME, OBJECT_PATH, REQUEST_INTERFACE};
use gemmad_client::{pb, user_prompt, ClientError, ServingStatus};
use tonic::Code;
use zbus::message::Header;
use zbus::names::OwnedUniqueName;
use zbus::object_server::ObjectServer;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

/// A private bus, stopped when dropped.
struct PrivateBus {
    child: Child,
    address: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn private_bus() -> Option<PrivateBus> {
    let dir = std::env::temp_dir().join(format!("gemmad-dbus-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let dir = TempDir(dir);
    let socket = dir.0.join("bus");
    let mut child = match Command::new("dbus-daemon")
        .arg("--session")
        .arg(format!("--address=unix:path={}", socket.display()))
        .args(["--nofork", "--nopidfile", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: cannot start dbus-daemon ({e})");
            return None;
        }
    };
    // The address line says the bus is listening.
    let mut line = String::new();
    let out = child.stdout.take()?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).ok()?;
    let address = line.trim().to_string();
    if address.is_empty() {
        let _ = child.kill();
        eprintln!("skipped: dbus-daemon printed no address");
        return None;
    }
    Some(PrivateBus {
        child,
        address,
        _dir: dir,
    })
}

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.gemmad.Gemmad1.Error")]
enum MockError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Busy(String),
    PermissionDenied(String),
}

struct Mock {
    next_id: AtomicU64,
    /// Set when a "vanish" request has sent its first token.
    vanish_sent: Arc<tokio::sync::Notify>,
}

struct Request {
    cancelled: Arc<AtomicBool>,
}

#[zbus::interface(name = "org.gemmad.Gemmad1.Request")]
impl Request {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

fn prompt_of(req: &HashMap<String, OwnedVariant>) -> String {
    let Some(Variant::Array(msgs)) = req.get("messages").map(|v| &**v) else {
        return String::new();
    };
    let Some(Variant::Dict(last)) = msgs.last() else {
        return String::new();
    };
    last.iter()
        .find(|(k, _)| matches!(k, Variant::Str(k) if k.as_str() == "content"))
        .and_then(|(_, v)| match v {
            Variant::Variant(v) => match &**v {
                Variant::Str(s) => Some(s.as_str().to_string()),
                _ => None,
            },
            Variant::Str(s) => Some(s.as_str().to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

fn usage(id: u64, completion_tokens: u32) -> HashMap<&'static str, Variant<'static>> {
    HashMap::from([
        ("request_id", Variant::from(id)),
        ("prompt_tokens", 5u32.into()),
        ("completion_tokens", completion_tokens.into()),
        ("decode_tokens_per_s", 20.5f64.into()),
        ("active_slice", "E2B".into()),
    ])
}

async fn emit<B>(
    conn: &Connection,
    to: &OwnedUniqueName,
    path: &OwnedObjectPath,
    member: &str,
    body: &B,
) where
    B: serde::Serialize + zbus::DynamicType,
{
    conn.emit_signal(Some(to), path, REQUEST_INTERFACE, member, body)
        .await
        .expect("the stand-in emits a signal");
}

#[zbus::interface(name = "org.gemmad.Gemmad1")]
impl Mock {
    async fn generate(
        &self,
        request: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, MockError> {
        let prompt = prompt_of(&request);
        if prompt == "busy" {
            return Err(MockError::Busy(
                "the queue is full; retry after 100 ms".into(),
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let path = OwnedObjectPath::try_from(format!("/org/gemmad/Gemmad1/request/{id}"))?;
        let caller = OwnedUniqueName::from(hdr.sender().expect("a sender").to_owned());
        let cancelled = Arc::new(AtomicBool::new(false));
        server
            .at(
                &path,
                Request {
                    cancelled: cancelled.clone(),
                },
            )
            .await?;
        // Another request's signal, then this one's first token, both before the reply: the
        // client must skip the first and keep the second.
        let other = OwnedObjectPath::try_from("/org/gemmad/Gemmad1/request/999")?;
        emit(conn, &caller, &other, "Token", &("NOT MINE", vec![0u32])).await;
        emit(conn, &caller, &path, "Token", &("Hel", vec![1u32])).await;
        let (conn, server, vanish_sent) = (conn.clone(), server.clone(), self.vanish_sent.clone());
        let p = path.clone();
        tokio::spawn(async move {
            match prompt.as_str() {
                "fail" => {
                    let name = "org.gemmad.Gemmad1.Error.Internal";
                    emit(&conn, &caller, &p, "Failed", &(name, "the engine broke")).await;
                }
                "slow" => {
                    for _ in 0..500 {
                        if cancelled.load(Ordering::SeqCst) {
                            emit(&conn, &caller, &p, "Finished", &("cancelled", usage(id, 1)))
                                .await;
                            break;
                        }
                        emit(&conn, &caller, &p, "Token", &("x", vec![2u32])).await;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                "vanish" => vanish_sent.notify_one(),
                _ => {
                    emit(&conn, &caller, &p, "Token", &("lo", vec![2u32])).await;
                    emit(&conn, &caller, &p, "Finished", &("eos", usage(id, 2))).await;
                }
            }
            let _ = server.remove::<Request, _>(&p).await;
        });
        Ok(path)
    }

    fn detokenize(&self, ids: Vec<u32>) -> String {
        ids.iter().map(u32::to_string).collect::<Vec<_>>().join("+")
    }

    #[zbus(out_args("ids", "context_tokens"))]
    fn tokenize_with(&self, input: HashMap<String, OwnedVariant>) -> (Vec<u32>, u32) {
        let add_special = input
            .get("add_special")
            .and_then(|v| bool::try_from(v).ok())
            .unwrap_or(false);
        let text = input
            .get("text")
            .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
            .unwrap_or_default();
        let mut ids: Vec<u32> = if add_special { vec![2] } else { vec![] };
        ids.extend(text.bytes().map(u32::from));
        (ids, 4096)
    }

    fn set_slice(&self, name: String, force: bool) -> (String, u32, HashMap<String, OwnedVariant>) {
        let attrs = HashMap::from([
            ("params".to_string(), owned(if force { 2u64 } else { 1u64 })),
            ("active".to_string(), owned(true)),
        ]);
        (name, 30, attrs)
    }

    fn governor_pin(&self, _tier: String) -> Result<(), MockError> {
        Err(MockError::PermissionDenied("admins only".into()))
    }

    fn get_status(&self) -> HashMap<String, OwnedVariant> {
        let queue: HashMap<&str, Variant> = HashMap::from([("waiting", Variant::from(2u32))]);
        HashMap::from([
            ("version".to_string(), owned("9.9.9")),
            ("queue".to_string(), owned(queue)),
        ])
    }
}

fn owned<'a>(v: impl Into<Variant<'a>>) -> OwnedVariant {
    v.into().try_into_owned().expect("no fds here")
}

async fn serve(address: &str, vanish_sent: Arc<tokio::sync::Notify>) -> Connection {
    zbus::connection::Builder::address(address)
        .name(BUS_NAME)
        .serve_at(
            OBJECT_PATH,
            Mock {
                next_id: AtomicU64::new(1),
                vanish_sent,
            },
        )
        .build()
        .await
        .expect("the stand-in gemmad starts")
}

#[tokio::test]
async fn dbus_client_against_a_stand_in_gemmad() {
    let Some(bus) = private_bus() else {
        return;
    };
    let on = Bus::Address(bus.address.clone());

    // Nobody owns the name yet.
    match DbusClient::connect(on.clone()).await {
        Err(ClientError::Bus { reason, .. }) => {
            assert!(
                reason.contains("nothing owns the name org.gemmad.Gemmad1"),
                "{reason}"
            )
        }
        other => panic!("expected a Bus error, got {other:?}"),
    }

    let vanish_sent = Arc::new(tokio::sync::Notify::new());
    let server = serve(&bus.address, vanish_sent.clone()).await;
    let c = DbusClient::connect(on.clone()).await.expect("connects");
    assert_eq!(c.health("").await.unwrap(), ServingStatus::Serving);

    // Signals before the reply are kept; another path's are not.
    let g = c
        .generate_text(user_prompt("hello"))
        .await
        .expect("generates");
    assert_eq!(g.text, "Hello");
    assert_eq!(g.token_ids, [1, 2]);
    let f = g.finished.expect("finished");
    assert_eq!(f.finish_reason, pb::FinishReason::Eos as i32);
    assert_eq!(f.usage.unwrap().completion_tokens, 2);
    assert_eq!(f.timings.unwrap().active_slice, "E2B");
    assert_eq!(g.request_id, 1);

    // Errors: from the call, and from a Failed signal after it.
    let e = c.generate_text(user_prompt("busy")).await.unwrap_err();
    let s = e.status().expect("a status");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "100");
    let e = c.generate_text(user_prompt("fail")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Internal), "{e}");
    assert_eq!(e.status().unwrap().message(), "the engine broke");

    // Cancelling a running generation.
    let mut s = c.generate(user_prompt("slow")).await.unwrap();
    let first = s.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(pb::generate_response::Event::Delta(_))
    ));
    s.cancel().await.expect("cancels");
    let end = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    match end {
        Err(e) => assert_eq!(e.code(), Some(Code::Cancelled), "{e}"),
        other => panic!("expected CANCELLED, got {other:?}"),
    }
    assert_eq!(s.message().await.unwrap(), None);
    assert!(s.request_id().is_some());

    // The other methods.
    assert_eq!(c.detokenize(vec![2, 105]).await.unwrap(), "2+105");
    let t = c.tokenize("AB", true).await.unwrap();
    assert_eq!((t.ids, t.context_tokens), (vec![2, 65, 66], 4096));
    let sl = c.set_slice("E4B", true).await.unwrap();
    assert_eq!(
        (sl.name.as_str(), sl.layers, sl.params, sl.active),
        ("E4B", 30, 2, true)
    );
    let e = c.governor_pin(Some("saver")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    let st = c.status().await.unwrap();
    assert_eq!(st.version, "9.9.9");
    assert_eq!(st.queue.unwrap().waiting, 2);
    assert_eq!(st.model, None);
    // The stand-in has no LoadModality.
    let e = c.load_modality(pb::Modality::Vision).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unimplemented), "{e}");

    // gemmad leaving the bus mid-generation ends the stream rather than hanging it.
    let mut s = c.generate(user_prompt("vanish")).await.unwrap();
    assert!(s.message().await.unwrap().is_some());
    vanish_sent.notified().await;
    server.close().await.expect("the stand-in closes");
    let e = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("the stream ends")
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
    assert!(e.to_string().contains("left the bus"), "{e}");
    assert_eq!(c.health("").await.unwrap(), ServingStatus::NotServing);
}
