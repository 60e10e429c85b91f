//! Requests as D-Bus arguments: pb requests and messages as the `a{sv}` dicts of
//! docs/dbus.md, and what D-Bus cannot express refused by name.

use std::collections::HashMap;

use serde::ser::{SerializeMap, Serializer};
use tonic::Status;
use zbus::{OwnedVariant, Signature, Type};

use crate::{pb, ClientError};

/// A value of an `a{sv}` argument, with the D-Bus type docs/dbus.md gives its key.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Arg {
    Str(String),
    U32(u32),
    U64(u64),
    F64(f64),
    Bool(bool),
    Strs(Vec<String>),
    U32s(Vec<u32>),
    /// `ay`: serialized byte by byte, never as one variant per byte.
    Bytes(Vec<u8>),
    Dicts(Vec<ArgDict>),
}

/// An `a{sv}` argument in the order its keys were added.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ArgDict(pub(crate) Vec<(&'static str, Arg)>);

impl ArgDict {
    fn push(&mut self, key: &'static str, v: Arg) {
        self.0.push((key, v));
    }
}

impl Type for ArgDict {
    const SIGNATURE: &'static Signature = <HashMap<String, OwnedVariant> as Type>::SIGNATURE;
}

impl serde::Serialize for ArgDict {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Type for Arg {
    const SIGNATURE: &'static Signature = &Signature::Variant;
}

impl serde::Serialize for Arg {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use zbus::as_variant::serialize as v;
        match self {
            Arg::Str(x) => v(x, ser),
            Arg::U32(x) => v(x, ser),
            Arg::U64(x) => v(x, ser),
            Arg::F64(x) => v(x, ser),
            Arg::Bool(x) => v(x, ser),
            Arg::Strs(x) => v(x, ser),
            Arg::U32s(x) => v(x, ser),
            Arg::Bytes(x) => v(x, ser),
            Arg::Dicts(x) => v(x, ser),
        }
    }
}

fn not_on_dbus(reason: String) -> ClientError {
    ClientError::NotOnDbus(reason)
}

/// Generate's request dict (docs/dbus.md, "Generate's request keys"). Only what the request
/// sets is sent; the rest takes the daemon's defaults, as over gRPC.
pub(crate) fn request_dict(r: pb::GenerateRequest) -> Result<ArgDict, ClientError> {
    let mut d = ArgDict::default();
    d.push("messages", Arg::Dicts(message_dicts(r.messages)?));
    if let Some(s) = r.sampling {
        if let Some(x) = s.temperature {
            d.push("temperature", Arg::F64(x.into()));
        }
        if let Some(x) = s.top_k {
            d.push("top_k", Arg::U32(x));
        }
        if let Some(x) = s.top_p {
            d.push("top_p", Arg::F64(x.into()));
        }
        if let Some(x) = s.min_p {
            d.push("min_p", Arg::F64(x.into()));
        }
        if let Some(x) = s.repetition_penalty {
            d.push("repetition_penalty", Arg::F64(x.into()));
        }
        if let Some(x) = s.seed {
            d.push("seed", Arg::U64(x));
        }
    }
    if r.max_tokens > 0 {
        d.push("max_tokens", Arg::U32(r.max_tokens));
    }
    if !r.stop.is_empty() {
        d.push("stop", Arg::Strs(r.stop));
    }
    match pb::Priority::try_from(r.priority) {
        Ok(pb::Priority::Unspecified) => {}
        Ok(pb::Priority::Interactive) => d.push("priority", Arg::Str("interactive".into())),
        Ok(pb::Priority::Background) => d.push("priority", Arg::Str("background".into())),
        Err(_) => {
            return Err(ClientError::Rpc(Status::invalid_argument(format!(
                "priority {} is not a known priority",
                r.priority
            ))))
        }
    }
    if !r.size.is_empty() {
        d.push("slice", Arg::Str(r.size));
    }
    if r.ignore_eos {
        d.push("ignore_eos", Arg::Bool(true));
    }
    if let Some(c) = r.cache_prompt {
        d.push("cache_prompt", Arg::Bool(c));
    }
    Ok(d)
}

/// CachePrompt's argument dict (docs/dbus.md): `messages` or `ids`, whichever is set (the
/// daemon refuses both or neither, as over gRPC), and `shared`/`persist` when true.
pub(crate) fn cache_prompt_dict(r: pb::CachePromptRequest) -> Result<ArgDict, ClientError> {
    let mut d = ArgDict::default();
    if !r.messages.is_empty() {
        d.push("messages", Arg::Dicts(message_dicts(r.messages)?));
    }
    if !r.ids.is_empty() {
        d.push("ids", Arg::U32s(r.ids));
    }
    if r.shared {
        d.push("shared", Arg::Bool(true));
    }
    if r.persist {
        d.push("persist", Arg::Bool(true));
    }
    Ok(d)
}

/// Messages as `aa{sv}`. A D-Bus message holds at most one image, one audio clip and one
/// text, rendered in that order, so a pb message with more, or in another order, is
/// refused rather than silently reordered.
pub(crate) fn message_dicts(messages: Vec<pb::Message>) -> Result<Vec<ArgDict>, ClientError> {
    use pb::part::Kind;
    const ORDER: [&str; 3] = ["image", "audio", "text"];
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let mut d = ArgDict::default();
        d.push("role", Arg::Str(m.role));
        let mut last: Option<usize> = None;
        for (j, p) in m.parts.into_iter().enumerate() {
            let at = format!("messages[{i}].parts[{j}]");
            let Some(kind) = p.kind else {
                return Err(ClientError::Rpc(Status::invalid_argument(format!(
                    "{at} is empty: set text, image or audio"
                ))));
            };
            let rank = match &kind {
                Kind::Image(_) => 0,
                Kind::Audio(_) => 1,
                Kind::Text(_) => 2,
            };
            if let Some(prev) = last.filter(|&prev| prev >= rank) {
                return Err(not_on_dbus(format!(
                    "{at} is {} after {}: a D-Bus message holds at most one image, one audio \
                     clip and one text, in that order",
                    article(ORDER[rank]),
                    article(ORDER[prev])
                )));
            }
            last = Some(rank);
            match kind {
                Kind::Image(img) => {
                    d.push("image", Arg::Bytes(img.data));
                    if !img.mime_type.is_empty() {
                        d.push("image_mime", Arg::Str(img.mime_type));
                    }
                }
                Kind::Audio(a) => {
                    match pb::AudioFormat::try_from(a.format) {
                        // The daemon detects WAV from the bytes, as over gRPC.
                        Ok(pb::AudioFormat::Wav) | Ok(pb::AudioFormat::Unspecified) => {}
                        Ok(f) => {
                            return Err(not_on_dbus(format!(
                                "{at}.audio is raw PCM ({}): D-Bus carries WAV files only; \
                                 wrap the samples in a WAV header",
                                f.as_str_name()
                            )))
                        }
                        Err(_) => {
                            return Err(ClientError::Rpc(Status::invalid_argument(format!(
                                "{at}.audio: unknown format {}",
                                a.format
                            ))))
                        }
                    }
                    d.push("audio", Arg::Bytes(a.data));
                }
                Kind::Text(t) => d.push("content", Arg::Str(t)),
            }
        }
        out.push(d);
    }
    Ok(out)
}

fn article(what: &str) -> String {
    match what {
        "image" => "an image".into(),
        "audio" => "an audio clip".into(),
        _ => "a text".into(),
    }
}

pub(super) fn modality_name(m: pb::Modality) -> Option<&'static str> {
    match m {
        pb::Modality::Vision => Some("vision"),
        pb::Modality::Audio => Some("audio"),
        pb::Modality::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dbus::reply::unwrap;
    use crate::dbus::tests::{dict_of, through_wire};
    use crate::{image_part, message, text_part, wav_part};
    use tonic::Code;
    use zbus::Variant;

    fn sig(v: &OwnedVariant) -> String {
        unwrap(v).value_signature().to_string()
    }

    fn str_of(v: &Variant<'_>) -> String {
        match unwrap(v) {
            Variant::Str(s) => s.as_str().to_string(),
            other => panic!("expected s, got {other:?}"),
        }
    }

    fn bytes_of(v: &Variant<'_>) -> Vec<u8> {
        match unwrap(v) {
            Variant::Array(a) => a
                .iter()
                .map(|b| match b {
                    Variant::U8(b) => *b,
                    other => panic!("expected y, got {other:?}"),
                })
                .collect(),
            other => panic!("expected ay, got {other:?}"),
        }
    }

    fn message_dicts_of(v: &OwnedVariant) -> Vec<HashMap<String, String>> {
        // Each message's keys with the signature (or the string) of their values.
        let Variant::Array(a) = unwrap(v) else {
            panic!("messages is not an array: {v:?}");
        };
        a.iter()
            .map(|m| {
                let Variant::Dict(d) = unwrap(m) else {
                    panic!("a message is not a dict: {m:?}");
                };
                d.iter()
                    .map(|(k, v)| {
                        let v = unwrap(v);
                        let shown = match v {
                            Variant::Str(s) => format!("s:{}", s.as_str()),
                            other => other.value_signature().to_string(),
                        };
                        (str_of(k), shown)
                    })
                    .collect()
            })
            .collect()
    }

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\nrest";
    const WAV: &[u8] = b"RIFF\x24\0\0\0WAVEfmt ";

    fn full_request() -> pb::GenerateRequest {
        let mut img = image_part(PNG.to_vec());
        if let Some(pb::part::Kind::Image(i)) = &mut img.kind {
            i.mime_type = "image/png".into();
        }
        pb::GenerateRequest {
            messages: vec![
                message("system", vec![text_part("Be brief.")]),
                message(
                    "user",
                    vec![img, wav_part(WAV.to_vec()), text_part("What is this?")],
                ),
            ],
            sampling: Some(pb::Sampling {
                temperature: Some(0.5),
                top_k: Some(40),
                top_p: Some(0.9),
                min_p: Some(0.05),
                repetition_penalty: Some(1.1),
                seed: Some(u64::MAX - 1),
            }),
            max_tokens: 128,
            stop: vec!["\n\n".into(), "END".into()],
            size: "E2B".into(),
            priority: pb::Priority::Background as i32,
            ignore_eos: true,
            cache_prompt: Some(false),
        }
    }

    #[test]
    fn request_dict_has_every_key_with_its_spec_type() {
        let msg = through_wire(&(request_dict(full_request()).unwrap(),));
        assert_eq!(msg.body().signature().to_string(), "a{sv}");
        let d = dict_of(&msg);
        let mut keys: Vec<_> = d.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "cache_prompt",
                "ignore_eos",
                "max_tokens",
                "messages",
                "min_p",
                "priority",
                "repetition_penalty",
                "seed",
                "slice",
                "stop",
                "temperature",
                "top_k",
                "top_p"
            ]
        );
        let types: HashMap<&str, String> = d.iter().map(|(k, v)| (k.as_str(), sig(v))).collect();
        for (k, t) in [
            ("messages", "aa{sv}"),
            ("temperature", "d"),
            ("top_k", "u"),
            ("top_p", "d"),
            ("min_p", "d"),
            ("repetition_penalty", "d"),
            ("seed", "t"),
            ("max_tokens", "u"),
            ("stop", "as"),
            ("priority", "s"),
            ("slice", "s"),
            ("ignore_eos", "b"),
            ("cache_prompt", "b"),
        ] {
            assert_eq!(types[k], t, "type of {k}");
        }
        assert!(!bool::try_from(&d["cache_prompt"]).unwrap());
        assert_eq!(u32::try_from(&d["top_k"]).unwrap(), 40);
        assert_eq!(u32::try_from(&d["max_tokens"]).unwrap(), 128);
        assert_eq!(u64::try_from(&d["seed"]).unwrap(), u64::MAX - 1);
        // The f32 widened exactly, so the daemon's f32 is the one asked for.
        assert_eq!(f64::try_from(&d["temperature"]).unwrap() as f32, 0.5);
        assert_eq!(f64::try_from(&d["top_p"]).unwrap() as f32, 0.9);
        assert_eq!(f64::try_from(&d["min_p"]).unwrap() as f32, 0.05);
        assert_eq!(f64::try_from(&d["repetition_penalty"]).unwrap() as f32, 1.1);
        assert!(bool::try_from(&d["ignore_eos"]).unwrap());
        assert_eq!(str_of(&d["priority"]), "background");
        assert_eq!(str_of(&d["slice"]), "E2B");
        let stop: Vec<String> = match unwrap(&d["stop"]) {
            Variant::Array(a) => a.iter().map(str_of).collect(),
            other => panic!("stop is {other:?}"),
        };
        assert_eq!(stop, ["\n\n", "END"]);

        let msgs = message_dicts_of(&d["messages"]);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].len(), 2);
        assert_eq!(msgs[0]["role"], "s:system");
        assert_eq!(msgs[0]["content"], "s:Be brief.");
        assert_eq!(msgs[1].len(), 5);
        assert_eq!(msgs[1]["role"], "s:user");
        assert_eq!(msgs[1]["image"], "ay");
        assert_eq!(msgs[1]["image_mime"], "s:image/png");
        assert_eq!(msgs[1]["audio"], "ay");
        assert_eq!(msgs[1]["content"], "s:What is this?");
        // The media bytes arrive unchanged.
        let Variant::Array(a) = unwrap(&d["messages"]) else {
            unreachable!()
        };
        let Variant::Dict(user) = unwrap(&a[1]) else {
            unreachable!()
        };
        let get = |k: &str| {
            user.iter()
                .find(|(key, _)| str_of(key) == k)
                .map(|(_, v)| bytes_of(v))
                .unwrap()
        };
        assert_eq!(get("image"), PNG);
        assert_eq!(get("audio"), WAV);
    }

    #[test]
    fn request_dict_sends_only_what_is_set() {
        let d = dict_of(&through_wire(&(
            request_dict(crate::user_prompt("Hi")).unwrap(),
        )));
        assert_eq!(d.keys().collect::<Vec<_>>(), ["messages"]);
        let msgs = message_dicts_of(&d["messages"]);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].len(), 2);
        assert_eq!(msgs[0]["role"], "s:user");
        assert_eq!(msgs[0]["content"], "s:Hi");

        // An explicit interactive priority is sent; an image without a mime type has none.
        let mut r = crate::user_prompt("Hi");
        r.priority = pb::Priority::Interactive as i32;
        r.messages[0].parts.insert(0, image_part(PNG.to_vec()));
        r.sampling = Some(pb::Sampling {
            seed: Some(7),
            ..Default::default()
        });
        let d = dict_of(&through_wire(&(request_dict(r).unwrap(),)));
        assert_eq!(str_of(&d["priority"]), "interactive");
        assert_eq!(u64::try_from(&d["seed"]).unwrap(), 7);
        assert!(!d.contains_key("temperature"));
        let msgs = message_dicts_of(&d["messages"]);
        assert!(msgs[0].contains_key("image"));
        assert!(!msgs[0].contains_key("image_mime"));
        // cache_prompt is sent when set, either way.
        let mut r = crate::user_prompt("Hi");
        r.cache_prompt = Some(true);
        let d = dict_of(&through_wire(&(request_dict(r).unwrap(),)));
        assert!(bool::try_from(&d["cache_prompt"]).unwrap());
    }

    #[test]
    fn cache_prompt_dict_sends_what_is_set() {
        let r = pb::CachePromptRequest {
            messages: vec![message("system", vec![text_part("Be brief.")])],
            shared: true,
            persist: true,
            ..Default::default()
        };
        let msg = through_wire(&(cache_prompt_dict(r).unwrap(),));
        assert_eq!(msg.body().signature().to_string(), "a{sv}");
        let d = dict_of(&msg);
        let mut keys: Vec<_> = d.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["messages", "persist", "shared"]);
        assert_eq!(sig(&d["messages"]), "aa{sv}");
        assert_eq!(sig(&d["shared"]), "b");
        assert!(bool::try_from(&d["shared"]).unwrap() && bool::try_from(&d["persist"]).unwrap());
        let msgs = message_dicts_of(&d["messages"]);
        assert_eq!(msgs[0]["role"], "s:system");
        assert_eq!(msgs[0]["content"], "s:Be brief.");

        let r = pb::CachePromptRequest {
            ids: vec![2, 105, 7],
            ..Default::default()
        };
        let d = dict_of(&through_wire(&(cache_prompt_dict(r).unwrap(),)));
        assert_eq!(d.keys().collect::<Vec<_>>(), ["ids"]);
        assert_eq!(sig(&d["ids"]), "au");
        let ids: Vec<u32> = match unwrap(&d["ids"]) {
            Variant::Array(a) => a
                .iter()
                .map(|x| match x {
                    Variant::U32(x) => *x,
                    other => panic!("expected u, got {other:?}"),
                })
                .collect(),
            other => panic!("ids is {other:?}"),
        };
        assert_eq!(ids, [2, 105, 7]);
    }

    #[test]
    fn requests_dbus_cannot_express_are_refused_by_name() {
        let pcm = pb::Part {
            kind: Some(pb::part::Kind::Audio(pb::Audio {
                data: vec![0; 64],
                format: pb::AudioFormat::PcmS16le as i32,
                sample_rate_hz: 16000,
                channels: 1,
            })),
        };
        let cases = [
            (
                vec![pcm, text_part("x")],
                "messages[0].parts[0].audio is raw PCM (AUDIO_FORMAT_PCM_S16LE)",
            ),
            (
                vec![image_part(PNG.to_vec()), image_part(PNG.to_vec())],
                "messages[0].parts[1] is an image after an image",
            ),
            (
                vec![text_part("x"), image_part(PNG.to_vec())],
                "messages[0].parts[1] is an image after a text",
            ),
            (
                vec![text_part("a"), text_part("b")],
                "messages[0].parts[1] is a text after a text",
            ),
        ];
        for (parts, want) in cases {
            let r = pb::GenerateRequest {
                messages: vec![message("user", parts)],
                ..Default::default()
            };
            match request_dict(r) {
                Err(ClientError::NotOnDbus(m)) => assert!(m.starts_with(want), "{m}"),
                other => panic!("{want}: got {other:?}"),
            }
        }
        let r = pb::GenerateRequest {
            messages: vec![message("user", vec![pb::Part { kind: None }])],
            ..Default::default()
        };
        let e = request_dict(r).unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument));
        assert!(
            e.to_string().contains("messages[0].parts[0] is empty"),
            "{e}"
        );
        let r = pb::GenerateRequest {
            priority: 9,
            ..crate::user_prompt("x")
        };
        assert_eq!(
            request_dict(r).unwrap_err().code(),
            Some(Code::InvalidArgument)
        );
    }
}
