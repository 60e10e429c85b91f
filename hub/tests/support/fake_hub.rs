//! A fake Hugging Face Hub for tests (docs/hub-and-openai.md §A.8 of the handout): real
//! sockets, real HTTP/1.1, the Hub's URL layout and headers. Two listeners on
//! 127.0.0.1 with different ports: the "Hub" (API and `/resolve/`) and the "CDN" that
//! LFS files redirect to (another origin, so the client must not send the token there;
//! any request with `Authorization` on it is logged as a leak and refused).
//!
//! Shared by the hub crate's tests and the end-to-end tests (`tests/tests/pull.rs`
//! includes this file by path). Only std, sha2, sha1 and serde_json.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha1::Digest;

/// One file of the fake repo.
#[derive(Clone, Debug)]
pub struct HubFile {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Served as an LFS file (302 to the CDN, sha256 etag) instead of a git file.
    pub lfs: bool,
}

/// Misbehaviours, each switched on by a test.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Requests need `Authorization: Bearer <token>`: 401 without one, 403 with another.
    pub gated_token: Option<String>,
    /// The next body of this file is cut after half of it (the connection closes).
    pub drop_once: Option<String>,
    /// Range requests are answered 200 with the whole file.
    pub ignore_range: bool,
    /// This file's body has one byte flipped (same length).
    pub corrupt: Option<String>,
    /// The next API request is answered with this status.
    pub fail_api_once: Option<u16>,
    /// `/resolve/` answers lack `X-Repo-Commit`.
    pub no_commit_header: bool,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    /// "hub" or "cdn".
    pub origin: &'static str,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    pub accept_encoding: Option<String>,
    /// The status answered.
    pub status: u16,
}

struct State {
    /// Canonical `org/name`.
    repo: String,
    commit: String,
    files: Vec<HubFile>,
    faults: Faults,
    log: Vec<Logged>,
    cdn_url: String,
}

pub struct FakeHub {
    pub url: String,
    pub cdn_url: String,
    state: Arc<Mutex<State>>,
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex(&sha2::Sha256::digest(b))
}

pub fn git_sha1_hex(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The files of the bundled tiny checkpoint (engine/tests/fixtures/text) as a Hub repo
/// holds them, `model.safetensors` in LFS, plus files gemmad must not take.
pub fn fixture_files(fixture: &Path) -> Vec<HubFile> {
    let mut v = Vec::new();
    for (name, lfs) in [
        ("config.json", false),
        ("generation_config.json", false),
        ("tokenizer.json", false),
        ("tokenizer_config.json", false),
        ("model.safetensors", true),
    ] {
        let bytes = std::fs::read(fixture.join(name)).expect("fixture file");
        v.push(HubFile {
            name: name.into(),
            bytes,
            lfs,
        });
    }
    for (name, text) in [
        ("README.md", "---\nlicense: gemma\n---\n"),
        (".gitattributes", "*.safetensors filter=lfs\n"),
        ("onnx/model.safetensors", "not for gemmad"),
    ] {
        v.push(HubFile {
            name: name.into(),
            bytes: text.as_bytes().to_vec(),
            lfs: false,
        });
    }
    v
}

pub fn commit_of(n: u8) -> String {
    format!("{:02x}", n).repeat(20)
}

impl FakeHub {
    /// Serves `repo` (`org/name`) at `commit` with `files`.
    pub fn start(repo: &str, commit: &str, files: Vec<HubFile>) -> FakeHub {
        let hub = TcpListener::bind("127.0.0.1:0").expect("bind hub");
        let cdn = TcpListener::bind("127.0.0.1:0").expect("bind cdn");
        let url = format!("http://{}", hub.local_addr().unwrap());
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repo: repo.into(),
            commit: commit.into(),
            files,
            faults: Faults::default(),
            log: Vec::new(),
            cdn_url: cdn_url.clone(),
        }));
        for (l, origin) in [(hub, "hub"), (cdn, "cdn")] {
            let st = state.clone();
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, origin, &st);
                    });
                }
            });
        }
        FakeHub {
            url,
            cdn_url,
            state,
        }
    }

    pub fn set_faults(&self, f: Faults) {
        self.state.lock().unwrap().faults = f;
    }

    /// A new commit with new files (the repo moved on).
    pub fn publish(&self, commit: &str, files: Vec<HubFile>) {
        let mut s = self.state.lock().unwrap();
        s.commit = commit.into();
        s.files = files;
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// Requests to the CDN that carried a token.
    pub fn leaks(&self) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| l.origin == "cdn" && l.authorization.is_some())
            .collect()
    }
}

struct Req {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some(Req {
        method,
        path,
        headers,
    })
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Close after this many body bytes (a dropped connection).
    cut_at: Option<usize>,
}

impl Answer {
    fn new(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_at: None,
        }
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Answer {
        self.headers.push((k.into(), v.into()));
        self
    }
    fn json(self, v: serde_json::Value) -> Answer {
        let mut a = self.header("Content-Type", "application/json");
        a.body = v.to_string().into_bytes();
        a
    }
    fn error(status: u16, code: &str, msg: &str) -> Answer {
        Answer::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", msg)
            .json(serde_json::json!({ "error": msg }))
    }
}

fn serve(conn: TcpStream, origin: &'static str, st: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let Some(req) = read_request(&mut reader) else {
        return Ok(());
    };
    let answer = {
        let mut s = st.lock().unwrap();
        let a = if origin == "cdn" {
            cdn(&mut s, &req)
        } else {
            hub(&mut s, &req)
        };
        s.log.push(Logged {
            origin,
            path: req.path.clone(),
            range: req.headers.get("range").cloned(),
            authorization: req.headers.get("authorization").cloned(),
            accept_encoding: req.headers.get("accept-encoding").cloned(),
            status: a.status,
        });
        a
    };
    let mut out = conn;
    let mut head = format!("HTTP/1.1 {} X\r\n", answer.status);
    for (k, v) in &answer.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        answer.body.len()
    ));
    out.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        let n = answer.cut_at.unwrap_or(answer.body.len());
        out.write_all(&answer.body[..n])?;
    }
    out.flush()?;
    let _ = out.shutdown(std::net::Shutdown::Both);
    let _ = reader.read(&mut [0u8; 1]);
    Ok(())
}

/// Checks the gated-repo token; `Some(answer)` refuses.
fn gate(s: &State, req: &Req) -> Option<Answer> {
    let want = s.faults.gated_token.as_ref()?;
    let msg_401 = format!(
        "Access to model {} is restricted. You must have access to it and be authenticated to access it. Please log in.",
        s.repo
    );
    match req.headers.get("authorization") {
        None => Some(Answer::error(401, "GatedRepo", &msg_401)),
        Some(a) if *a == format!("Bearer {want}") => None,
        Some(_) => Some(Answer::error(
            403,
            "GatedRepo",
            &format!(
                "Access to model {0} is restricted and you are not in the authorized list. Visit https://huggingface.co/{0} to ask for access.",
                s.repo
            ),
        )),
    }
}

fn hub(s: &mut State, req: &Req) -> Answer {
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/models/{org}/{name}/revision/{rev}
    if segs.len() == 6 && segs[0] == "api" && segs[1] == "models" && segs[4] == "revision" {
        if let Some(code) = s.faults.fail_api_once.take() {
            return Answer::error(code, "", "try again");
        }
        let repo = format!("{}/{}", segs[2], segs[3]);
        if !repo.eq_ignore_ascii_case(&s.repo) {
            return Answer::error(404, "RepoNotFound", "Repository not found");
        }
        if let Some(a) = gate(s, req) {
            return a;
        }
        let rev = segs[5].replace("%2F", "/");
        if rev != "main" && rev != s.commit {
            return Answer::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
        }
        let blobs = query.split('&').any(|kv| kv == "blobs=true");
        let siblings: Vec<serde_json::Value> = s
            .files
            .iter()
            .map(|f| {
                let mut v = serde_json::json!({ "rfilename": f.name });
                if blobs {
                    v["size"] = f.bytes.len().into();
                    if f.lfs {
                        v["blobId"] = git_sha1_hex(b"pointer").into();
                        v["lfs"] = serde_json::json!({
                            "sha256": sha256_hex(&f.bytes),
                            "size": f.bytes.len(),
                            "pointerSize": 134,
                        });
                    } else {
                        v["blobId"] = git_sha1_hex(&f.bytes).into();
                    }
                }
                v
            })
            .collect();
        return Answer::new(200).json(serde_json::json!({
            "id": s.repo, "modelId": s.repo, "sha": s.commit, "private": false,
            "gated": if s.faults.gated_token.is_some() { serde_json::json!("manual") } else { serde_json::json!(false) },
            "siblings": siblings,
        }));
    }
    // /{org}/{name}/resolve/{rev}/{file}
    if segs.len() >= 5 && segs[2] == "resolve" {
        let repo = format!("{}/{}", segs[0], segs[1]);
        if !repo.eq_ignore_ascii_case(&s.repo) {
            return Answer::error(404, "RepoNotFound", "Repository not found");
        }
        if repo != s.repo {
            // The Hub's case/rename redirect: relative, to the canonical name.
            let rest = segs[2..].join("/");
            return Answer::new(307).header("Location", format!("/{}/{rest}", s.repo));
        }
        if let Some(a) = gate(s, req) {
            return a;
        }
        let rev = segs[3];
        if rev != s.commit && rev != "main" {
            return Answer::error(404, "RevisionNotFound", "Invalid rev id");
        }
        let name = segs[4..].join("/").replace("%20", " ");
        let Some(f) = s.files.iter().find(|f| f.name == name).cloned() else {
            return Answer::error(404, "EntryNotFound", &format!("{name} does not exist"))
                .header("X-Repo-Commit", s.commit.clone());
        };
        let mut a = if f.lfs {
            let sha = sha256_hex(&f.bytes);
            Answer::new(302)
                .header("Location", format!("{}/cdn/{sha}", s.cdn_url))
                .header("X-Linked-Etag", format!("\"{sha}\""))
                .header("X-Linked-Size", f.bytes.len().to_string())
                .header("ETag", format!("\"{sha}\""))
                .header("X-Xet-Hash", "0".repeat(64))
        } else {
            body_answer(s, req, &f).header("ETag", format!("\"{}\"", git_sha1_hex(&f.bytes)))
        };
        if !s.faults.no_commit_header {
            a = a.header("X-Repo-Commit", s.commit.clone());
        }
        return a;
    }
    Answer::error(404, "", "not found")
}

fn cdn(s: &mut State, req: &Req) -> Answer {
    if req.headers.contains_key("authorization") {
        return Answer::error(400, "", "token leaked to the CDN");
    }
    let sha = req.path.trim_start_matches("/cdn/");
    match s
        .files
        .iter()
        .find(|f| f.lfs && sha256_hex(&f.bytes) == sha)
        .cloned()
    {
        Some(f) => body_answer(s, req, &f),
        None => Answer::error(404, "", "no such object"),
    }
}

/// The file's bytes: all (200) or from a `Range: bytes=a-` start (206), with faults.
fn body_answer(s: &mut State, req: &Req, f: &HubFile) -> Answer {
    let mut bytes = f.bytes.clone();
    if s.faults.corrupt.as_deref() == Some(&f.name) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let total = bytes.len();
    let start = req
        .headers
        .get("range")
        .filter(|_| !s.faults.ignore_range)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, _)| a.parse::<usize>().ok());
    let mut a = match start {
        Some(st) if st >= total => {
            return Answer::new(416).header("Content-Range", format!("bytes */{total}"))
        }
        Some(st) => {
            let mut a = Answer::new(206)
                .header("Content-Range", format!("bytes {st}-{}/{total}", total - 1));
            a.body = bytes[st..].to_vec();
            a
        }
        None => {
            let mut a = Answer::new(200);
            a.body = bytes;
            a
        }
    };
    a = a.header("Accept-Ranges", "bytes");
    if s.faults.drop_once.as_deref() == Some(&f.name) {
        s.faults.drop_once = None;
        a.cut_at = Some(a.body.len() / 2);
    }
    a
}
