//! The D-Bus edge: `a{sv}` requests to the core's types, the core's results and errors
//! to D-Bus values and named errors (docs/dbus.md).

use std::collections::HashMap;

use gemmad_engine::{FinishReason, Modality, PinnedPrompt, PromptCacheState, TowerState};
use zbus::{OwnedVariant, Variant};

use crate::core::types::{
    Finished, GenerateParams, Message, Part, Priority, Sampling, SliceInfo, StatusSnapshot,
};
use crate::core::ServiceError;

/// The errors of `org.gemmad.Gemmad1`, one name per kind of service error.
#[derive(zbus::DBusError, Debug)]
#[zbus(prefix = "org.gemmad.Gemmad1.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    InvalidArgument(String),
    Busy(String),
    PermissionDenied(String),
    ModalityUnavailable(String),
    Unavailable(String),
    ShuttingDown(String),
    Internal(String),
}

impl From<ServiceError> for Error {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidArgument(m) => Error::InvalidArgument(m),
            ServiceError::FailedPrecondition(m) => Error::Unavailable(m),
            ServiceError::ModalityUnavailable(m) => Error::ModalityUnavailable(m),
            ServiceError::ResourceExhausted {
                message,
                retry_after,
            } => {
                // The hint goes last in a fixed form clients can read (D-Bus errors carry
                // no fields); the core's own wording of it would say it twice.
                let head = match message.rfind("; retry in about ") {
                    Some(i) if message[i..].ends_with(" ms") => &message[..i],
                    _ => message.as_str(),
                };
                Error::Busy(format!(
                    "{head} (retry after {} ms)",
                    retry_after.as_millis()
                ))
            }
            ServiceError::Unavailable(m) => Error::ShuttingDown(m),
            ServiceError::PermissionDenied(m) => Error::PermissionDenied(m),
            ServiceError::Internal(m) => Error::Internal(m),
        }
    }
}

/// The D-Bus name and message of a service error (a request's `Failed` signal).
pub fn error_name(e: &ServiceError) -> &'static str {
    match e {
        ServiceError::InvalidArgument(_) => "org.gemmad.Gemmad1.Error.InvalidArgument",
        ServiceError::FailedPrecondition(_) => "org.gemmad.Gemmad1.Error.Unavailable",
        ServiceError::ModalityUnavailable(_) => "org.gemmad.Gemmad1.Error.ModalityUnavailable",
        ServiceError::ResourceExhausted { .. } => "org.gemmad.Gemmad1.Error.Busy",
        ServiceError::Unavailable(_) => "org.gemmad.Gemmad1.Error.ShuttingDown",
        ServiceError::PermissionDenied(_) => "org.gemmad.Gemmad1.Error.PermissionDenied",
        ServiceError::Internal(_) => "org.gemmad.Gemmad1.Error.Internal",
    }
}

/// Text as a D-Bus string can carry it. D-Bus strings cannot hold U+0000, and the bus
/// disconnects a peer that sends one (gemmad would lose its name): each NUL, the
/// detokenized byte token `<0x00>`, becomes U+FFFD. The ids sent alongside stay exact.
pub fn dbus_text(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    }
}

fn bad(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// A value of a dict, checked against the type the key takes.
fn typed<T>(key: &str, want: &str, v: OwnedVariant) -> Result<T, Error>
where
    T: TryFrom<OwnedVariant>,
{
    let got = v.value_signature().to_string();
    if got != want {
        return Err(bad(format!("{key} must be of type {want}, not {got}")));
    }
    T::try_from(v).map_err(|_| bad(format!("{key}: cannot read a value of type {want}")))
}

fn bytes(key: &str, v: OwnedVariant) -> Result<Vec<u8>, Error> {
    let got = v.value_signature().to_string();
    if got != "ay" {
        return Err(bad(format!("{key} must be of type ay, not {got}")));
    }
    Vec::<u8>::try_from(v).map_err(|e| bad(format!("{key}: {e}")))
}

/// Generate's `a{sv}` request as the core's parameters. Unknown keys and keys of the
/// wrong type are refused, naming the key.
pub fn generate(mut req: HashMap<String, OwnedVariant>) -> Result<GenerateParams, Error> {
    let mut p = GenerateParams::default();
    let prompt = req.remove("prompt");
    let messages = req.remove("messages");
    p.messages = match (prompt, messages) {
        (Some(_), Some(_)) => return Err(bad("set prompt or messages, not both".into())),
        (None, None) => return Err(bad("set prompt (s) or messages (aa{sv})".into())),
        (Some(v), None) => vec![Message {
            role: "user".into(),
            parts: vec![Part::Text(typed("prompt", "s", v)?)],
        }],
        (None, Some(v)) => parse_messages(v)?,
    };
    let mut s = Sampling::default();
    // Sorted, so that the first bad key named is the same every time.
    let mut keys: Vec<(String, OwnedVariant)> = req.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, v) in keys {
        let k = key.as_str();
        match k {
            "raw" => p.raw = typed(k, "b", v)?,
            "max_tokens" => p.max_tokens = typed(k, "u", v)?,
            "temperature" => s.temperature = Some(typed::<f64>(k, "d", v)? as f32),
            "top_p" => s.top_p = Some(typed::<f64>(k, "d", v)? as f32),
            "min_p" => s.min_p = Some(typed::<f64>(k, "d", v)? as f32),
            "repetition_penalty" => s.repetition_penalty = Some(typed::<f64>(k, "d", v)? as f32),
            "top_k" => s.top_k = Some(typed(k, "u", v)?),
            "seed" => s.seed = Some(typed(k, "t", v)?),
            "stop" => {
                let got = v.value_signature().to_string();
                if got != "as" {
                    return Err(bad(format!("stop must be of type as, not {got}")));
                }
                p.stop = Vec::<String>::try_from(v).map_err(|e| bad(format!("stop: {e}")))?;
            }
            "ignore_eos" => p.ignore_eos = typed(k, "b", v)?,
            "priority" => {
                p.priority = match typed::<String>(k, "s", v)?.as_str() {
                    "" | "interactive" => Priority::Interactive,
                    "background" => Priority::Background,
                    other => {
                        return Err(bad(format!(
                            "priority {other:?} is not interactive or background"
                        )))
                    }
                }
            }
            "slice" => p.size = typed(k, "s", v)?,
            "cache_prompt" => p.no_prompt_cache = !typed::<bool>(k, "b", v)?,
            other => {
                return Err(bad(format!(
                    "unknown key {other:?}; the keys are prompt, messages, raw, max_tokens, \
                     temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, \
                     ignore_eos, priority, slice, cache_prompt"
                )))
            }
        }
    }
    p.sampling = s;
    Ok(p)
}

/// CachePrompt's `a{sv}` arguments.
#[derive(Debug, Default, PartialEq)]
pub struct CachePromptArgs {
    pub messages: Vec<Message>,
    pub ids: Vec<u32>,
    pub shared: bool,
    pub persist: bool,
}

/// CachePrompt's `a{sv}`: `messages` (aa{sv}) or `ids` (au), `shared` b, `persist` b.
/// Unknown keys, keys of the wrong type and both or neither of the prompt's forms are
/// refused, naming the key.
pub fn cache_prompt(mut args: HashMap<String, OwnedVariant>) -> Result<CachePromptArgs, Error> {
    let mut a = CachePromptArgs::default();
    match (args.remove("messages"), args.remove("ids")) {
        (Some(_), Some(_)) => return Err(bad("set messages or ids, not both".into())),
        (None, None) => {
            return Err(bad(
                "set messages (aa{sv}) or ids (au): the prompt to cache".into(),
            ))
        }
        (Some(m), None) => a.messages = parse_messages(m)?,
        (None, Some(v)) => {
            let got = v.value_signature().to_string();
            if got != "au" {
                return Err(bad(format!("ids must be of type au, not {got}")));
            }
            a.ids = Vec::<u32>::try_from(v).map_err(|e| bad(format!("ids: {e}")))?;
        }
    }
    let mut keys: Vec<(String, OwnedVariant)> = args.into_iter().collect();
    keys.sort_by(|x, y| x.0.cmp(&y.0));
    for (key, v) in keys {
        let k = key.as_str();
        match k {
            "shared" => a.shared = typed(k, "b", v)?,
            "persist" => a.persist = typed(k, "b", v)?,
            other => {
                return Err(bad(format!(
                    "unknown key {other:?}; the keys are messages, ids, shared, persist"
                )))
            }
        }
    }
    Ok(a)
}

/// `messages` (aa{sv}): role, content, image, image_mime, audio per message.
pub fn parse_messages(v: OwnedVariant) -> Result<Vec<Message>, Error> {
    let got = v.value_signature().to_string();
    if got != "aa{sv}" {
        return Err(bad(format!("messages must be of type aa{{sv}}, not {got}")));
    }
    let list = Vec::<HashMap<String, OwnedVariant>>::try_from(v)
        .map_err(|e| bad(format!("messages: {e}")))?;
    list.into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            let at = |k: &str| format!("messages[{i}].{k}");
            let role = match m.remove("role") {
                Some(v) => typed(&at("role"), "s", v)?,
                None => return Err(bad(format!("messages[{i}] has no role"))),
            };
            let mut parts = Vec::new();
            let mime = match m.remove("image_mime") {
                Some(v) => typed(&at("image_mime"), "s", v)?,
                None => String::new(),
            };
            if let Some(v) = m.remove("image") {
                parts.push(Part::Image {
                    data: bytes(&at("image"), v)?,
                    mime_type: mime,
                });
            }
            if let Some(v) = m.remove("audio") {
                parts.push(Part::Audio {
                    data: bytes(&at("audio"), v)?,
                    format: crate::core::types::AudioFormat::Wav,
                    sample_rate_hz: 0,
                    channels: 0,
                });
            }
            if let Some(v) = m.remove("content") {
                parts.push(Part::Text(typed(&at("content"), "s", v)?));
            }
            if let Some(k) = m.keys().min() {
                return Err(bad(format!(
                    "messages[{i}]: unknown key {k:?}; the keys are role, content, image, \
                     image_mime, audio"
                )));
            }
            Ok(Message { role, parts })
        })
        .collect()
}

/// Builds `a{sv}` values; the `Variant`s are all plain values (no file descriptors).
pub type Dict = HashMap<String, Variant<'static>>;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn u32_sat(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos => "eos",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContextFull => "context_full",
        FinishReason::Cancelled => "cancelled",
    }
}

/// `Finished`'s usage and timings.
pub fn usage(request_id: u64, f: &Finished) -> Dict {
    let t = &f.timings;
    let mut d = Dict::new();
    d.insert("request_id".into(), request_id.into());
    d.insert("prompt_tokens".into(), u32_sat(f.prompt_tokens).into());
    d.insert(
        "completion_tokens".into(),
        u32_sat(f.completion_tokens).into(),
    );
    d.insert("cached_tokens".into(), u32_sat(f.cached_tokens).into());
    d.insert("queue_wait_ms".into(), ms(t.queue_wait).into());
    d.insert(
        "time_to_first_token_ms".into(),
        ms(t.time_to_first_token).into(),
    );
    d.insert("prefill_ms".into(), ms(t.prefill).into());
    d.insert("prefill_tokens_per_s".into(), t.prefill_tokens_per_s.into());
    d.insert("decode_ms".into(), ms(t.decode).into());
    d.insert("decode_tokens_per_s".into(), t.decode_tokens_per_s.into());
    d.insert("active_slice".into(), f.active_slice.clone().into());
    d
}

/// A slice as `(sua{sv})`.
pub fn slice(s: SliceInfo) -> (String, u32, Dict) {
    let mut d = Dict::new();
    d.insert("params".into(), s.params.into());
    d.insert("active".into(), s.active.into());
    let widths: Vec<u32> = s.ffn_widths.iter().map(|&w| u32_sat(w)).collect();
    d.insert("ffn_widths".into(), widths.into());
    (s.name, u32_sat(s.layers), d)
}

pub fn modality(s: &str) -> Result<Modality, Error> {
    match s {
        "vision" => Ok(Modality::Vision),
        "audio" => Ok(Modality::Audio),
        other => Err(bad(format!("modality {other:?} is not vision or audio"))),
    }
}

pub fn modality_name(m: Modality) -> &'static str {
    match m {
        Modality::Vision => "vision",
        Modality::Audio => "audio",
    }
}

pub fn tower(t: &TowerState) -> Dict {
    let mut d = Dict::new();
    d.insert("modality".into(), modality_name(t.modality).into());
    d.insert("available".into(), t.available.into());
    d.insert("loaded".into(), t.loaded.into());
    d.insert("bytes".into(), t.bytes.into());
    d
}

pub fn memory(parts: &[(String, u64)]) -> HashMap<String, u64> {
    parts.iter().cloned().collect()
}

fn dict(d: Dict) -> Variant<'static> {
    Variant::from(d)
}

/// A pinned prompt (CachePrompt's reply, an entry of `prompt_cache.pinned`): `key` s,
/// `tokens` u, `shared` b, `uid` u (only when not shared), `slice` s, `ram_bytes` t,
/// `on_disk` b.
pub fn cached_prompt(p: &PinnedPrompt) -> Dict {
    let mut d = Dict::new();
    d.insert("key".into(), p.key.clone().into());
    d.insert("tokens".into(), u32_sat(p.tokens).into());
    d.insert("shared".into(), p.owner.shared.into());
    if let (false, Some(uid)) = (p.owner.shared, p.owner.user) {
        d.insert("uid".into(), uid.into());
    }
    d.insert("slice".into(), p.slice.clone().into());
    d.insert("ram_bytes".into(), p.ram_bytes.into());
    d.insert("on_disk".into(), p.on_disk.into());
    d
}

/// GetStatus's `prompt_cache`: gRPC's PromptCacheInfo.
pub fn prompt_cache(c: &PromptCacheState) -> Dict {
    let mut d = Dict::new();
    d.insert("enabled".into(), c.enabled.into());
    d.insert("ram_bytes".into(), c.ram_bytes.into());
    d.insert("ram_budget".into(), c.ram_budget.into());
    d.insert("entries".into(), u32_sat(c.entries).into());
    d.insert("disk_bytes".into(), c.disk_bytes.into());
    d.insert("disk_budget".into(), c.disk_budget.into());
    d.insert("disk_entries".into(), u32_sat(c.disk_entries).into());
    d.insert("hits".into(), c.hits.into());
    d.insert("reused_tokens".into(), c.reused_tokens.into());
    let pinned: Vec<Dict> = c.pinned.iter().map(cached_prompt).collect();
    d.insert("pinned".into(), pinned.into());
    d
}

/// GetStatus's `a{sv}`: the fields of gRPC's StatusResponse.
pub fn status(s: &StatusSnapshot) -> Dict {
    let (m, q, c, n) = (&s.model, &s.queue, &s.requests, &s.connections);
    let mut model = Dict::new();
    model.insert("dir".into(), m.dir.display().to_string().into());
    model.insert("model_type".into(), m.model_type.clone().into());
    model.insert("layers".into(), u32_sat(m.layers).into());
    model.insert("hidden_size".into(), u32_sat(m.hidden_size).into());
    model.insert("vocab_size".into(), u32_sat(m.vocab_size).into());
    model.insert(
        "context_tokens".into(),
        u32_sat(s.engine.max_context).into(),
    );
    model.insert("quant".into(), s.engine.quant.to_string().into());
    model.insert("kernels".into(), s.engine.kernels.to_string().into());
    model.insert("threads".into(), u32_sat(s.engine.threads).into());
    model.insert("isa".into(), s.engine.isa.to_string().into());
    model.insert("pack".into(), s.engine.pack.into());

    let mut queue = Dict::new();
    queue.insert(
        "waiting".into(),
        u32_sat(q.waiting_interactive + q.waiting_background).into(),
    );
    queue.insert(
        "waiting_interactive".into(),
        u32_sat(q.waiting_interactive).into(),
    );
    queue.insert(
        "waiting_background".into(),
        u32_sat(q.waiting_background).into(),
    );
    queue.insert("running".into(), q.running.into());
    queue.insert("depth".into(), u32_sat(q.depth).into());
    queue.insert("per_peer".into(), u32_sat(q.per_peer).into());

    let requests: HashMap<String, u64> = [
        ("admitted", c.admitted),
        ("completed", c.completed),
        ("cancelled", c.cancelled),
        ("failed", c.failed),
        ("rejected", c.rejected),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let mut conns = Dict::new();
    conns.insert("open".into(), u32_sat(n.open).into());
    conns.insert("accepted".into(), n.accepted.into());
    conns.insert("refused".into(), n.refused.into());
    conns.insert("over_limit".into(), n.over_limit.into());
    conns.insert("accept_errors".into(), n.accept_errors.into());
    conns.insert("max_per_uid".into(), u32_sat(n.max_per_uid).into());
    conns.insert("max_total".into(), u32_sat(n.max_total).into());

    let towers: Vec<Dict> = s.engine.towers.iter().map(tower).collect();

    let mut d = Dict::new();
    d.insert("version".into(), s.version.to_string().into());
    d.insert("uptime_s".into(), s.uptime.as_secs_f64().into());
    d.insert("model".into(), dict(model));
    d.insert("active_slice".into(), s.engine.slice.clone().into());
    d.insert("towers".into(), towers.into());
    d.insert("memory".into(), memory(&s.memory).into());
    d.insert("queue".into(), dict(queue));
    d.insert("requests".into(), requests.into());
    d.insert("connections".into(), dict(conns));
    d.insert("warnings".into(), s.engine.warnings.clone().into());
    d.insert(
        "prompt_cache".into(),
        dict(prompt_cache(&s.engine.prompt_cache)),
    );
    if let Some(g) = &s.governor {
        let mut gd = Dict::new();
        gd.insert("tier".into(), g.tier.clone().into());
        gd.insert("pinned".into(), g.pinned.clone().unwrap_or_default().into());
        gd.insert("readings".into(), g.readings.clone().into());
        gd.insert("last_actions".into(), g.last_actions.clone().into());
        gd.insert("transitions".into(), g.transitions.into());
        gd.insert("actions_applied".into(), g.actions_applied.into());
        d.insert("governor".into(), dict(gd));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ov(v: Variant<'static>) -> OwnedVariant {
        v.try_into_owned().expect("plain value")
    }

    fn req(pairs: Vec<(&str, Variant<'static>)>) -> HashMap<String, OwnedVariant> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), ov(v)))
            .collect()
    }

    #[test]
    fn every_key_reaches_the_params() {
        let p = generate(req(vec![
            ("prompt", "hi".into()),
            ("max_tokens", 7u32.into()),
            ("temperature", 0.5f64.into()),
            ("top_k", 3u32.into()),
            ("top_p", 0.9f64.into()),
            ("seed", 42u64.into()),
            ("stop", vec!["x".to_string()].into()),
            ("raw", true.into()),
            ("priority", "background".into()),
            ("slice", "e2b".into()),
            ("ignore_eos", true.into()),
            ("cache_prompt", false.into()),
        ]))
        .unwrap();
        assert_eq!(p.messages.len(), 1);
        assert_eq!(p.messages[0].role, "user");
        assert_eq!(p.messages[0].parts, vec![Part::Text("hi".into())]);
        assert_eq!(p.max_tokens, 7);
        assert_eq!(p.sampling.temperature, Some(0.5));
        assert_eq!(p.sampling.top_k, Some(3));
        assert_eq!(p.sampling.seed, Some(42));
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert!(p.raw && p.ignore_eos);
        assert_eq!(p.priority, Priority::Background);
        assert_eq!(p.size, "e2b");
        assert!(p.no_prompt_cache);
        // Absent or true: the prompt cache is used.
        let p = generate(req(vec![("prompt", "hi".into())])).unwrap();
        assert!(!p.no_prompt_cache);
        let p = generate(req(vec![
            ("prompt", "hi".into()),
            ("cache_prompt", true.into()),
        ]))
        .unwrap();
        assert!(!p.no_prompt_cache);
        let e = generate(req(vec![
            ("prompt", "hi".into()),
            ("cache_prompt", 1u32.into()),
        ]));
        assert!(
            matches!(e, Err(Error::InvalidArgument(m)) if m.contains("cache_prompt must be of type b, not u"))
        );
    }

    #[test]
    fn cache_prompt_args_take_one_form_of_the_prompt() {
        let mut m = Dict::new();
        m.insert("role".into(), "system".into());
        m.insert("content".into(), "Be brief.".into());
        let a = cache_prompt(req(vec![
            ("messages", vec![m.clone()].into()),
            ("shared", true.into()),
            ("persist", true.into()),
        ]))
        .unwrap();
        assert_eq!(a.messages.len(), 1);
        assert_eq!(a.messages[0].role, "system");
        assert_eq!(a.messages[0].parts, vec![Part::Text("Be brief.".into())]);
        assert!(a.ids.is_empty() && a.shared && a.persist);
        let a = cache_prompt(req(vec![("ids", vec![2u32, 105, 7].into())])).unwrap();
        assert_eq!(a.ids, [2, 105, 7]);
        assert!(a.messages.is_empty() && !a.shared && !a.persist);

        for (args, want) in [
            (
                vec![
                    ("messages", Variant::from(vec![m.clone()])),
                    ("ids", vec![2u32].into()),
                ],
                "set messages or ids, not both",
            ),
            (
                vec![("shared", true.into())],
                "set messages (aa{sv}) or ids",
            ),
            (
                vec![("ids", vec![2u32].into()), ("keep", true.into())],
                "unknown key \"keep\"",
            ),
            (
                vec![("ids", vec![2i32].into())],
                "ids must be of type au, not ai",
            ),
            (
                vec![("ids", vec![2u32].into()), ("shared", "yes".into())],
                "shared must be of type b, not s",
            ),
            (
                vec![("messages", "hi".into())],
                "messages must be of type aa{sv}, not s",
            ),
        ] {
            match cache_prompt(req(args)) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains(want), "{msg}"),
                other => panic!("{want}: got {other:?}"),
            }
        }
    }

    #[test]
    fn pinned_prompts_and_the_cache_as_dicts() {
        let mine = PinnedPrompt {
            key: "0123456789abcdef".into(),
            tokens: 40,
            owner: gemmad_engine::CacheOwner::user(Some(1000)),
            slice: "full".into(),
            ram_bytes: 4096,
            on_disk: true,
        };
        let d = cached_prompt(&mine);
        assert_eq!(d["key"], Variant::from("0123456789abcdef"));
        assert_eq!(d["tokens"], Variant::from(40u32));
        assert_eq!(d["shared"], Variant::from(false));
        assert_eq!(d["uid"], Variant::from(1000u32));
        assert_eq!(d["slice"], Variant::from("full"));
        assert_eq!(d["ram_bytes"], Variant::from(4096u64));
        assert_eq!(d["on_disk"], Variant::from(true));
        let shared = PinnedPrompt {
            owner: gemmad_engine::CacheOwner {
                user: None,
                shared: true,
            },
            ..mine.clone()
        };
        let d = cached_prompt(&shared);
        assert_eq!(d["shared"], Variant::from(true));
        assert!(!d.contains_key("uid"));

        let c = PromptCacheState {
            enabled: true,
            ram_bytes: 1,
            ram_budget: 2,
            entries: 3,
            disk_bytes: 4,
            disk_budget: 5,
            disk_entries: 6,
            hits: 7,
            reused_tokens: 8,
            pinned: vec![mine, shared],
        };
        let d = prompt_cache(&c);
        let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "disk_budget",
                "disk_bytes",
                "disk_entries",
                "enabled",
                "entries",
                "hits",
                "pinned",
                "ram_budget",
                "ram_bytes",
                "reused_tokens"
            ]
        );
        assert_eq!(d["entries"], Variant::from(3u32));
        assert_eq!(d["disk_entries"], Variant::from(6u32));
        assert_eq!(d["hits"], Variant::from(7u64));
        assert_eq!(d["pinned"].value_signature().to_string(), "aa{sv}");
        let Variant::Array(a) = &d["pinned"] else {
            panic!("pinned is {:?}", d["pinned"]);
        };
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let e = generate(req(vec![("prompt", "hi".into()), ("tempo", 1u32.into())]));
        assert!(matches!(e, Err(Error::InvalidArgument(m)) if m.contains("\"tempo\"")));
        let e = generate(req(vec![
            ("prompt", "hi".into()),
            ("max_tokens", 5i32.into()),
        ]));
        assert!(
            matches!(e, Err(Error::InvalidArgument(m)) if m.contains("max_tokens must be of type u, not i"))
        );
        let e = generate(req(vec![("max_tokens", 5u32.into())]));
        assert!(matches!(e, Err(Error::InvalidArgument(m)) if m.contains("set prompt")));
    }

    #[test]
    fn messages_take_their_parts_in_order() {
        let mut m = Dict::new();
        m.insert("role".into(), "user".into());
        m.insert("content".into(), "what is this?".into());
        m.insert("image".into(), vec![1u8, 2, 3].into());
        let p = generate(req(vec![("messages", vec![m].into())])).unwrap();
        assert_eq!(
            p.messages[0].parts,
            vec![
                Part::Image {
                    data: vec![1, 2, 3],
                    mime_type: String::new()
                },
                Part::Text("what is this?".into())
            ]
        );
        let mut bad_msg = Dict::new();
        bad_msg.insert("role".into(), "user".into());
        bad_msg.insert("text".into(), "x".into());
        let e = generate(req(vec![("messages", vec![bad_msg].into())]));
        assert!(
            matches!(e, Err(Error::InvalidArgument(m)) if m.contains("messages[0]: unknown key \"text\""))
        );
    }

    #[test]
    fn nul_never_reaches_the_bus() {
        assert_eq!(dbus_text("a\0b\0".into()), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(dbus_text("plain".into()), "plain");
    }

    #[test]
    fn busy_carries_the_retry_hint() {
        let e = Error::from(ServiceError::ResourceExhausted {
            message: "queue full; retry in about 1500 ms".into(),
            retry_after: std::time::Duration::from_millis(1500),
        });
        assert!(matches!(e, Error::Busy(m) if m == "queue full (retry after 1500 ms)"));
        assert_eq!(
            error_name(&ServiceError::shutting_down()),
            "org.gemmad.Gemmad1.Error.ShuttingDown"
        );
    }
}
