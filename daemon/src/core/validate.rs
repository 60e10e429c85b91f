//! Every check a request gets before it is queued, once, for every front end: limits,
//! sampling, message shapes and media formats; then the engine's prompt pipeline turns
//! the messages into the ids the engine thread will run. Each refusal says what to
//! change.

use gemmad_engine::{
    ChatMessage, ContentPart, GenerateRequest, Prompt, Prompter, SamplingParams, FULL_SLICE,
};

use super::types::{AudioFormat, GenerateParams, Message, Part, Priority, Sampling};
use super::ServiceError;
use crate::config::LimitsSection;

/// A request ready for the queue.
pub struct Prepared {
    pub request: GenerateRequest,
    pub class: Priority,
}

fn bad(msg: impl Into<String>) -> ServiceError {
    ServiceError::invalid(msg)
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "model"];

/// What a request holds, counted before anything is copied: a front end that can count
/// on the wire (gRPC) checks these before it decodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub messages: usize,
    pub parts: usize,
    /// The message with the most parts: (its index, its parts).
    pub largest_message: (usize, usize),
    /// Image and audio parts.
    pub media: usize,
    pub stop_strings: usize,
}

impl Counts {
    pub fn of(messages: &[Message], stop_strings: usize) -> Counts {
        let mut c = Counts {
            messages: messages.len(),
            stop_strings,
            ..Counts::default()
        };
        for (i, m) in messages.iter().enumerate() {
            c.parts += m.parts.len();
            if m.parts.len() > c.largest_message.1 {
                c.largest_message = (i, m.parts.len());
            }
            c.media += m
                .parts
                .iter()
                .filter(|p| !matches!(p, Part::Text(_)))
                .count();
        }
        c
    }
}

/// Every count of a request against its limit.
pub fn counts(c: &Counts, limits: &LimitsSection) -> Result<(), ServiceError> {
    let l = limits;
    let (i, n) = c.largest_message;
    let in_message = format!("parts in messages[{i}]");
    let over = [
        (
            c.messages,
            l.max_messages,
            "messages in the request",
            "max_messages",
        ),
        (
            n,
            l.max_parts_per_message,
            &in_message,
            "max_parts_per_message",
        ),
        (c.parts, l.max_parts, "parts in the request", "max_parts"),
        (
            c.media,
            l.max_media_parts,
            "image and audio parts in the request",
            "max_media_parts",
        ),
        (
            c.stop_strings,
            l.max_stop_strings,
            "stop strings",
            "max_stop_strings",
        ),
    ]
    .into_iter()
    .find(|(n, limit, ..)| n > limit);
    match over {
        Some((n, limit, what, key)) => Err(bad(format!(
            "{n} {what} is too many (limits.{key} = {limit})"
        ))),
        None => Ok(()),
    }
}

/// Checks counts, then sizes and formats of `messages`, and moves them into engine chat
/// messages (nothing is copied).
pub fn messages(
    messages: Vec<Message>,
    limits: &LimitsSection,
) -> Result<Vec<ChatMessage>, ServiceError> {
    if messages.is_empty() {
        return Err(bad("messages is empty: send at least one message"));
    }
    counts(&Counts::of(&messages, 0), limits)?;
    let mut text_bytes = 0usize;
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
        for (j, p) in m.parts.iter().enumerate() {
            let at = || format!("messages[{i}].parts[{j}]");
            match p {
                Part::Text(t) => text_bytes += t.len(),
                Part::Image { data, mime_type } => check_image(data, mime_type, limits)
                    .map_err(|e| bad(format!("{}.image: {e}", at())))?,
                Part::Audio {
                    data,
                    format,
                    sample_rate_hz,
                    channels,
                } => check_audio(data, *format, *sample_rate_hz, *channels, limits)
                    .map_err(|e| bad(format!("{}.audio: {e}", at())))?,
            }
        }
    }
    if text_bytes > limits.max_prompt_bytes {
        return Err(bad(format!(
            "the messages hold {text_bytes} bytes of text; the limit is {} (limits.max_prompt_bytes)",
            limits.max_prompt_bytes
        )));
    }
    Ok(messages
        .into_iter()
        .map(|m| ChatMessage {
            role: m.role,
            content: m
                .parts
                .into_iter()
                .map(|p| match p {
                    Part::Text(t) => ContentPart::Text(t),
                    Part::Image { data, .. } => ContentPart::Image(data),
                    Part::Audio { data, .. } => ContentPart::Audio(data),
                })
                .collect(),
        })
        .collect())
}

fn check_image(d: &[u8], mime_type: &str, limits: &LimitsSection) -> Result<(), String> {
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
    if !mime_type.is_empty() && mime_type != kind {
        return Err(format!(
            "mime_type {mime_type:?} does not match the bytes, which are {kind}"
        ));
    }
    Ok(())
}

fn check_audio(
    d: &[u8],
    format: AudioFormat,
    sample_rate_hz: u32,
    channels: u32,
    limits: &LimitsSection,
) -> Result<(), String> {
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
    let sample_bytes = match format {
        AudioFormat::Wav => {
            return if is_wav {
                Ok(())
            } else {
                Err("the bytes are not a WAV file (no RIFF/WAVE header); for raw samples set format to a PCM format".into())
            };
        }
        AudioFormat::PcmS16le => 2,
        AudioFormat::PcmF32le => 4,
    };
    if !(8_000..=48_000).contains(&sample_rate_hz) {
        return Err(format!(
            "sample_rate_hz {sample_rate_hz} must be in 8000..=48000 for raw PCM"
        ));
    }
    if !(1..=2).contains(&channels) {
        return Err(format!("channels {channels} must be 1 or 2 for raw PCM"));
    }
    if !d.len().is_multiple_of(sample_bytes * channels as usize) {
        return Err("the PCM data length is not a whole number of frames".into());
    }
    Ok(())
}

pub fn sampling(s: &Sampling) -> Result<SamplingParams, ServiceError> {
    let mut p = SamplingParams::default();
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
    p.validate().map_err(|e| {
        bad(format!(
            "sampling: {}",
            e.to_string().trim_start_matches("invalid request: ")
        ))
    })?;
    Ok(p)
}

/// Text needs the checkpoint's tokenizer.
pub fn need_tokenizer(prompter: &Prompter) -> Result<(), ServiceError> {
    if prompter.has_tokenizer() {
        Ok(())
    } else {
        Err(ServiceError::FailedPrecondition(
            "the model has no tokenizer.json: text is not available".into(),
        ))
    }
}

/// The text of a raw request: one user message of one text part.
fn raw_text(mut msgs: Vec<Message>, limits: &LimitsSection) -> Result<String, ServiceError> {
    let shape = "a raw request takes one user message with one text part (no template, no media)";
    if msgs.len() != 1 || msgs[0].parts.len() != 1 {
        return Err(bad(shape));
    }
    let Some(Message { parts, .. }) = msgs.pop() else {
        return Err(bad(shape));
    };
    match parts.into_iter().next() {
        Some(Part::Text(t)) if t.len() > limits.max_prompt_bytes => Err(bad(format!(
            "the prompt is {} bytes; the limit is {} (limits.max_prompt_bytes)",
            t.len(),
            limits.max_prompt_bytes
        ))),
        Some(Part::Text(t)) if !t.is_empty() => Ok(t),
        Some(Part::Text(_)) => Err(bad("the prompt is empty")),
        _ => Err(bad(shape)),
    }
}

/// Validates `r` and prepares its prompt with the engine's pipeline. `slices` are the
/// names of the MatFormer slices the engine offers (a request may ask for one by name).
pub fn prepare(
    r: GenerateParams,
    prompter: &Prompter,
    limits: &LimitsSection,
    slices: &[String],
) -> Result<Prepared, ServiceError> {
    // Counts first: nothing below walks more items than the limits allow.
    counts(&Counts::of(&r.messages, r.stop.len()), limits)?;
    let sampling = sampling(&r.sampling)?;
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
    let slice = match r.size.as_str() {
        "" | "auto" => None,
        name if slices.iter().any(|s| s == name) => Some(name.to_string()),
        other => {
            let mut offered = slices.join(", ");
            if offered.is_empty() {
                offered = FULL_SLICE.to_string();
            }
            return Err(bad(format!(
                "size {:?} is not a slice of this model; use \"auto\" or one of: {offered}",
                truncate_for_error(other)
            )));
        }
    };
    let prompt = if r.raw {
        let text = raw_text(r.messages, limits)?;
        need_tokenizer(prompter)?;
        prompter.prepare(&Prompt::Text(text))?
    } else {
        let chat = messages(r.messages, limits)?;
        need_tokenizer(prompter)?;
        prompter.prepare(&Prompt::Chat(chat))?
    };
    let mut request = GenerateRequest::new(Prompt::Prepared(prompt));
    request.sampling = sampling;
    request.max_tokens = max_tokens;
    request.stop = r.stop;
    request.ignore_eos = r.ignore_eos;
    request.slice = slice;
    request.cache_prompt = !r.no_prompt_cache;
    Ok(Prepared {
        request,
        class: r.priority,
    })
}

/// At most 64 characters of a client's string, for an error message.
fn truncate_for_error(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_msg(role: &str, t: &str) -> Message {
        Message {
            role: role.into(),
            parts: vec![Part::Text(t.into())],
        }
    }

    fn media_msg(p: Part) -> Message {
        Message {
            role: "user".into(),
            parts: vec![p],
        }
    }

    fn invalid(r: Result<Vec<ChatMessage>, ServiceError>) -> bool {
        matches!(r, Err(ServiceError::InvalidArgument(_)))
    }

    #[test]
    fn checks_messages_and_media() {
        let l = LimitsSection::default();
        assert!(messages(vec![text_msg("user", "hi")], &l).is_ok());
        for bad_msgs in [
            vec![],
            vec![text_msg("robot", "hi")],
            vec![Message {
                role: "user".into(),
                parts: vec![],
            }],
        ] {
            assert!(invalid(messages(bad_msgs, &l)));
        }
        // Well-formed media pass this check (the engine's pipeline decides whether it
        // can run them).
        let png = media_msg(Part::Image {
            data: b"\x89PNG\r\n\x1a\nrest".to_vec(),
            mime_type: String::new(),
        });
        assert!(matches!(
            messages(vec![png], &l).unwrap()[0].content[0],
            ContentPart::Image(_)
        ));
        let gif = media_msg(Part::Image {
            data: b"GIF89a".to_vec(),
            mime_type: String::new(),
        });
        assert!(invalid(messages(vec![gif], &l)));
        let small = LimitsSection {
            max_image_bytes: 4,
            ..LimitsSection::default()
        };
        let big = media_msg(Part::Image {
            data: vec![0xFF, 0xD8, 0xFF, 0, 0],
            mime_type: String::new(),
        });
        let e = messages(vec![big], &small).unwrap_err();
        assert!(e.to_string().contains("max_image_bytes"), "{e:?}");
        let pcm = |len, rate| {
            media_msg(Part::Audio {
                data: vec![0; len],
                format: AudioFormat::PcmS16le,
                sample_rate_hz: rate,
                channels: 1,
            })
        };
        assert!(invalid(messages(vec![pcm(3, 16000)], &l)));
        assert!(invalid(messages(vec![pcm(4, 100)], &l)));
        assert!(messages(vec![pcm(4, 16000)], &l).is_ok());
    }

    #[test]
    fn counts_are_checked_before_anything_else() {
        let l = LimitsSection {
            max_messages: 3,
            max_parts_per_message: 2,
            max_parts: 4,
            max_media_parts: 1,
            max_stop_strings: 1,
            ..LimitsSection::default()
        };
        let msg = |parts: Vec<Part>| Message {
            role: "user".into(),
            parts,
        };
        let t = || Part::Text(String::new());
        let png = || Part::Image {
            data: b"\x89PNG\r\n\x1a\n".to_vec(),
            mime_type: String::new(),
        };
        for (msgs, key) in [
            (vec![msg(vec![t()]); 4], "limits.max_messages = 3"),
            (
                vec![msg(vec![t()]), msg(vec![t(); 3])],
                "3 parts in messages[1] is too many (limits.max_parts_per_message = 2)",
            ),
            (vec![msg(vec![t(), t()]); 3], "limits.max_parts = 4"),
            (vec![msg(vec![png(), png()])], "limits.max_media_parts = 1"),
        ] {
            let e = messages(msgs, &l).unwrap_err();
            assert!(e.to_string().contains(key), "{e} lacks {key}");
        }
        assert!(messages(vec![msg(vec![t(), png()]); 1], &l).is_ok());
        let c = Counts::of(&[msg(vec![t()]), msg(vec![png(), t()])], 2);
        assert_eq!(
            c,
            Counts {
                messages: 2,
                parts: 3,
                largest_message: (1, 2),
                media: 1,
                stop_strings: 2
            }
        );
        let e = counts(&c, &l).unwrap_err();
        assert!(e.to_string().contains("max_stop_strings"), "{e}");
    }

    #[test]
    fn checks_sampling() {
        assert!(sampling(&Sampling::default()).is_ok());
        let s = Sampling {
            top_p: Some(1.5),
            ..Default::default()
        };
        let e = sampling(&s).unwrap_err();
        assert!(matches!(e, ServiceError::InvalidArgument(_)));
        assert!(e.to_string().contains("top_p"), "{e:?}");
    }
}
