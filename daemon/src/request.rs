//! Turning a wire request into an engine request, with every check that can be made
//! before queuing. Each refusal is INVALID_ARGUMENT (or FAILED_PRECONDITION for a modality
//! the model cannot run) with a message that says what to change.

use gemmad_engine::{GenerateRequest, Prompt, SamplingParams, TextTokenizer};
use gemmad_proto::v1 as pb;
use serde_json::{json, Value};
use tonic::Status;

use crate::config::LimitsSection;
use crate::queue::Class;
use crate::worker::{engine_status, ModelInfo, FULL_SLICE};

/// A request ready for the queue.
pub struct Prepared {
    pub request: GenerateRequest,
    pub class: Class,
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "model"];

/// Checks sizes and formats of `messages` and returns them as the chat template's input.
/// Media parts are checked, then refused: no tower can run them yet.
pub fn chat_json(messages: &[pb::Message], limits: &LimitsSection) -> Result<Value, Status> {
    if messages.is_empty() {
        return Err(bad("messages is empty: send at least one message"));
    }
    if messages.len() > limits.max_messages {
        return Err(bad(format!(
            "{} messages is too many (limits.max_messages = {})",
            messages.len(),
            limits.max_messages
        )));
    }
    let mut text_bytes = 0usize;
    let mut media: Option<&'static str> = None;
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(bad(format!(
                "messages[{i}].role {:?} is not one of system, user, assistant, model",
                m.role
            )));
        }
        if m.parts.is_empty() {
            return Err(bad(format!("messages[{i}] has no parts")));
        }
        let mut parts = Vec::with_capacity(m.parts.len());
        for (j, p) in m.parts.iter().enumerate() {
            let at = format!("messages[{i}].parts[{j}]");
            match &p.kind {
                None => return Err(bad(format!("{at} is empty: set text, image or audio"))),
                Some(pb::part::Kind::Text(t)) => {
                    text_bytes += t.len();
                    parts.push(json!({"type": "text", "text": t}));
                }
                Some(pb::part::Kind::Image(img)) => {
                    check_image(img, limits).map_err(|e| bad(format!("{at}.image: {e}")))?;
                    media.get_or_insert("image");
                }
                Some(pb::part::Kind::Audio(a)) => {
                    check_audio(a, limits).map_err(|e| bad(format!("{at}.audio: {e}")))?;
                    media.get_or_insert("audio");
                }
            }
        }
        // A single text part renders as plain string content, as the engine does.
        let content = match parts.as_slice() {
            [p] => p["text"].clone(),
            _ => Value::Array(parts),
        };
        out.push(json!({"role": m.role, "content": content}));
    }
    if text_bytes > limits.max_prompt_bytes {
        return Err(bad(format!(
            "the messages hold {text_bytes} bytes of text; the limit is {} (limits.max_prompt_bytes)",
            limits.max_prompt_bytes
        )));
    }
    if let Some(kind) = media {
        let tower = if kind == "image" { "vision" } else { "audio" };
        return Err(Status::failed_precondition(format!(
            "{kind} input is not available: the {tower} tower is not loaded (this gemmad serves \
             text only for now); send text parts only"
        )));
    }
    Ok(Value::Array(out))
}

fn check_image(img: &pb::Image, limits: &LimitsSection) -> Result<(), String> {
    let d = &img.data;
    if d.is_empty() {
        return Err("data is empty".into());
    }
    if d.len() > limits.max_image_bytes {
        return Err(format!(
            "{} bytes is over the limit of {} (limits.max_image_bytes)",
            d.len(),
            limits.max_image_bytes
        ));
    }
    let kind = if d.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if d.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else {
        return Err("the bytes are neither PNG nor JPEG".into());
    };
    if !img.mime_type.is_empty() && img.mime_type != kind {
        return Err(format!(
            "mime_type {:?} does not match the bytes, which are {kind}",
            img.mime_type
        ));
    }
    Ok(())
}

fn check_audio(a: &pb::Audio, limits: &LimitsSection) -> Result<(), String> {
    let d = &a.data;
    if d.is_empty() {
        return Err("data is empty".into());
    }
    if d.len() > limits.max_audio_bytes {
        return Err(format!(
            "{} bytes is over the limit of {} (limits.max_audio_bytes)",
            d.len(),
            limits.max_audio_bytes
        ));
    }
    let is_wav = d.len() >= 12 && &d[0..4] == b"RIFF" && &d[8..12] == b"WAVE";
    let sample_bytes = match pb::AudioFormat::try_from(a.format) {
        Ok(pb::AudioFormat::Unspecified) | Ok(pb::AudioFormat::Wav) => {
            return if is_wav {
                Ok(())
            } else {
                Err("the bytes are not a WAV file (no RIFF/WAVE header); for raw samples set format to a PCM format".into())
            };
        }
        Ok(pb::AudioFormat::PcmS16le) => 2,
        Ok(pb::AudioFormat::PcmF32le) => 4,
        Err(_) => return Err(format!("unknown format {}", a.format)),
    };
    if !(8_000..=48_000).contains(&a.sample_rate_hz) {
        return Err(format!(
            "sample_rate_hz {} must be in 8000..=48000 for raw PCM",
            a.sample_rate_hz
        ));
    }
    if !(1..=2).contains(&a.channels) {
        return Err(format!(
            "channels {} must be 1 or 2 for raw PCM",
            a.channels
        ));
    }
    if !d.len().is_multiple_of(sample_bytes * a.channels as usize) {
        return Err("the PCM data length is not a whole number of frames".into());
    }
    Ok(())
}

/// The prompt's token ids as Generate would run them (chat template, then the tokenizer
/// without extra special tokens: the template emits <bos>).
pub fn prompt_ids(tok: &TextTokenizer, chat: &Value) -> Result<Vec<u32>, Status> {
    let text = tok.render_chat(chat, true).map_err(|e| engine_status(&e))?;
    tok.encode(&text, false).map_err(|e| engine_status(&e))
}

pub fn sampling(s: Option<&pb::Sampling>) -> Result<SamplingParams, Status> {
    let mut p = SamplingParams::default();
    if let Some(s) = s {
        if let Some(v) = s.temperature {
            p.temperature = v;
        }
        if let Some(v) = s.top_k {
            p.top_k = v as usize;
        }
        if let Some(v) = s.top_p {
            p.top_p = v;
        }
        if let Some(v) = s.min_p {
            p.min_p = v;
        }
        if let Some(v) = s.repetition_penalty {
            p.repetition_penalty = v;
        }
        p.seed = s.seed;
    }
    p.validate().map_err(|e| {
        bad(format!(
            "sampling: {}",
            e.to_string().trim_start_matches("invalid request: ")
        ))
    })?;
    Ok(p)
}

/// Validates `r` and tokenizes its prompt. `tok` is the front-end's tokenizer.
pub fn prepare(
    r: pb::GenerateRequest,
    tok: Option<&TextTokenizer>,
    model: &ModelInfo,
    limits: &LimitsSection,
) -> Result<Prepared, Status> {
    let sampling = sampling(r.sampling.as_ref())?;
    let max_tokens = match r.max_tokens as usize {
        0 => limits.default_max_tokens,
        n if n > limits.max_tokens => {
            return Err(bad(format!(
                "max_tokens {n} is over the limit of {} (limits.max_tokens)",
                limits.max_tokens
            )))
        }
        n => n,
    };
    if r.stop.len() > limits.max_stop_strings {
        return Err(bad(format!(
            "{} stop strings is too many (limits.max_stop_strings = {})",
            r.stop.len(),
            limits.max_stop_strings
        )));
    }
    for (i, s) in r.stop.iter().enumerate() {
        if s.is_empty() {
            return Err(bad(format!("stop[{i}] is empty")));
        }
        if s.len() > limits.max_stop_bytes {
            return Err(bad(format!(
                "stop[{i}] is {} bytes; the limit is {} (limits.max_stop_bytes)",
                s.len(),
                limits.max_stop_bytes
            )));
        }
    }
    match r.size.as_str() {
        "" | "auto" | FULL_SLICE => {}
        other => {
            return Err(bad(format!(
                "size {other:?} is not a slice of this model; use \"auto\" or one of: {FULL_SLICE}"
            )))
        }
    }
    let class = match pb::Priority::try_from(r.priority) {
        Ok(pb::Priority::Unspecified) | Ok(pb::Priority::Interactive) => Class::Interactive,
        Ok(pb::Priority::Background) => Class::Background,
        Err(_) => {
            return Err(bad(format!(
                "priority {} is not a known priority",
                r.priority
            )))
        }
    };
    let chat = chat_json(&r.messages, limits)?;
    let tok = tok.ok_or_else(|| {
        Status::failed_precondition(
            "the model has no tokenizer.json: text prompts are not available",
        )
    })?;
    let ids = prompt_ids(tok, &chat)?;
    if ids.len() >= model.context_tokens {
        return Err(bad(format!(
            "the prompt is {} tokens; the context holds {} and needs room for at least one \
             generated token: shorten the conversation",
            ids.len(),
            model.context_tokens
        )));
    }
    let mut request = GenerateRequest::new(Prompt::Ids(ids));
    request.sampling = sampling;
    request.max_tokens = max_tokens;
    request.stop = r.stop;
    request.ignore_eos = r.ignore_eos;
    Ok(Prepared { request, class })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_msg(role: &str, t: &str) -> pb::Message {
        pb::Message {
            role: role.into(),
            parts: vec![pb::Part {
                kind: Some(pb::part::Kind::Text(t.into())),
            }],
        }
    }

    fn media_msg(kind: pb::part::Kind) -> pb::Message {
        pb::Message {
            role: "user".into(),
            parts: vec![pb::Part { kind: Some(kind) }],
        }
    }

    #[test]
    fn checks_messages_and_media() {
        let l = LimitsSection::default();
        assert!(chat_json(&[text_msg("user", "hi")], &l).is_ok());
        for bad_msgs in [
            vec![],
            vec![text_msg("robot", "hi")],
            vec![pb::Message {
                role: "user".into(),
                parts: vec![],
            }],
        ] {
            let e = chat_json(&bad_msgs, &l).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        }
        let png = media_msg(pb::part::Kind::Image(pb::Image {
            data: b"\x89PNG\r\n\x1a\nrest".to_vec(),
            mime_type: String::new(),
        }));
        assert_eq!(
            chat_json(&[png], &l).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        let gif = media_msg(pb::part::Kind::Image(pb::Image {
            data: b"GIF89a".to_vec(),
            mime_type: String::new(),
        }));
        assert_eq!(
            chat_json(&[gif], &l).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let small = LimitsSection {
            max_image_bytes: 4,
            ..LimitsSection::default()
        };
        let big = media_msg(pb::part::Kind::Image(pb::Image {
            data: vec![0xFF, 0xD8, 0xFF, 0, 0],
            mime_type: String::new(),
        }));
        let e = chat_json(&[big], &small).unwrap_err();
        assert!(e.message().contains("max_image_bytes"), "{e:?}");
        let pcm = |len, rate| {
            media_msg(pb::part::Kind::Audio(pb::Audio {
                data: vec![0; len],
                format: pb::AudioFormat::PcmS16le as i32,
                sample_rate_hz: rate,
                channels: 1,
            }))
        };
        assert_eq!(
            chat_json(&[pcm(3, 16000)], &l).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            chat_json(&[pcm(4, 100)], &l).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            chat_json(&[pcm(4, 16000)], &l).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[test]
    fn checks_sampling() {
        assert!(sampling(None).is_ok());
        let s = pb::Sampling {
            top_p: Some(1.5),
            ..Default::default()
        };
        let e = sampling(Some(&s)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("top_p"), "{e:?}");
    }
}
