//! The gRPC edge: protobuf messages to and from the core's types, and service errors
//! to gRPC statuses.

use gemmad_engine::{FinishReason, Modality, TowerState};
use gemmad_proto::v1 as pb;
use pb::generate_response::Event as Ev;
use tonic::Status;

use crate::core::types::{
    AudioFormat, Event, GenerateParams, Message, Part, Priority, RequestTimings, Sampling,
};
use crate::core::validate::Counts;
use crate::core::ServiceError;

/// The status a service error becomes; a retry hint travels as `retry-after-ms`.
pub fn status(e: ServiceError) -> Status {
    match e {
        ServiceError::InvalidArgument(m) => Status::invalid_argument(m),
        ServiceError::FailedPrecondition(m) | ServiceError::ModalityUnavailable(m) => {
            Status::failed_precondition(m)
        }
        ServiceError::ResourceExhausted {
            message,
            retry_after,
        } => {
            let mut st = Status::resource_exhausted(message);
            if let Ok(v) = retry_after.as_millis().to_string().parse() {
                st.metadata_mut().insert("retry-after-ms", v);
            }
            st
        }
        ServiceError::Unavailable(m) => Status::unavailable(m),
        ServiceError::PermissionDenied(m) => Status::permission_denied(m),
        ServiceError::Internal(m) => Status::internal(m),
    }
}

/// Wire counts as the core's validation counts them.
pub fn counts(c: &gemmad_proto::wire::RequestCounts) -> Counts {
    Counts {
        messages: c.messages,
        parts: c.parts,
        largest_message: c.largest_message,
        media: c.media,
        stop_strings: c.stop_strings,
    }
}

fn bad(msg: String) -> Status {
    Status::invalid_argument(msg)
}

pub fn messages(msgs: Vec<pb::Message>) -> Result<Vec<Message>, Status> {
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let parts = m
                .parts
                .into_iter()
                .enumerate()
                .map(|(j, p)| part(p, i, j))
                .collect::<Result<_, _>>()?;
            Ok(Message {
                role: m.role,
                parts,
            })
        })
        .collect()
}

fn part(p: pb::Part, i: usize, j: usize) -> Result<Part, Status> {
    let at = || format!("messages[{i}].parts[{j}]");
    Ok(match p.kind {
        None => return Err(bad(format!("{} is empty: set text, image or audio", at()))),
        Some(pb::part::Kind::Text(t)) => Part::Text(t),
        Some(pb::part::Kind::Image(img)) => Part::Image {
            data: img.data,
            mime_type: img.mime_type,
        },
        Some(pb::part::Kind::Audio(a)) => Part::Audio {
            format: match pb::AudioFormat::try_from(a.format) {
                Ok(pb::AudioFormat::Unspecified) | Ok(pb::AudioFormat::Wav) => AudioFormat::Wav,
                Ok(pb::AudioFormat::PcmS16le) => AudioFormat::PcmS16le,
                Ok(pb::AudioFormat::PcmF32le) => AudioFormat::PcmF32le,
                Err(_) => return Err(bad(format!("{}.audio: unknown format {}", at(), a.format))),
            },
            data: a.data,
            sample_rate_hz: a.sample_rate_hz,
            channels: a.channels,
        },
    })
}

pub fn generate(r: pb::GenerateRequest) -> Result<GenerateParams, Status> {
    let priority = match pb::Priority::try_from(r.priority) {
        Ok(pb::Priority::Unspecified) | Ok(pb::Priority::Interactive) => Priority::Interactive,
        Ok(pb::Priority::Background) => Priority::Background,
        Err(_) => {
            return Err(bad(format!(
                "priority {} is not a known priority",
                r.priority
            )))
        }
    };
    let sampling = r
        .sampling
        .map(|s| Sampling {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
        })
        .unwrap_or_default();
    Ok(GenerateParams {
        messages: messages(r.messages)?,
        sampling,
        max_tokens: r.max_tokens,
        stop: r.stop,
        size: r.size,
        priority,
        ignore_eos: r.ignore_eos,
        raw: false,
        no_prompt_cache: r.cache_prompt == Some(false),
    })
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn timings(t: &RequestTimings, active_slice: String) -> pb::Timings {
    pb::Timings {
        queue_wait_ms: ms(t.queue_wait),
        time_to_first_token_ms: ms(t.time_to_first_token),
        prefill_ms: ms(t.prefill),
        prefill_tokens_per_s: t.prefill_tokens_per_s,
        decode_ms: ms(t.decode),
        decode_tokens_per_s: t.decode_tokens_per_s,
        active_slice,
    }
}

/// One streamed event on the wire (a failure is the stream's final status).
pub fn event(e: Event) -> Result<pb::GenerateResponse, Status> {
    let ev = match e {
        Event::Queued {
            request_id,
            position,
        } => Ev::Queued(pb::Queued {
            request_id,
            position: position as u32,
        }),
        Event::Started {
            request_id,
            run_seq,
            queue_wait,
            active_slice,
        } => Ev::Started(pb::Started {
            request_id,
            run_seq,
            queue_wait_ms: ms(queue_wait),
            active_slice,
        }),
        Event::Delta { text, ids } => Ev::Delta(pb::Delta {
            text,
            token_ids: ids,
        }),
        Event::Finished(f) => Ev::Finished(pb::Finished {
            finish_reason: match f.reason {
                FinishReason::Eos => pb::FinishReason::Eos,
                FinishReason::Stop => pb::FinishReason::Stop,
                FinishReason::Length => pb::FinishReason::Length,
                FinishReason::ContextFull => pb::FinishReason::ContextFull,
                FinishReason::Cancelled => pb::FinishReason::Unspecified,
            } as i32,
            usage: Some(pb::Usage {
                prompt_tokens: f.prompt_tokens as u32,
                completion_tokens: f.completion_tokens as u32,
                cached_tokens: f.cached_tokens as u32,
            }),
            timings: Some(timings(&f.timings, f.active_slice)),
        }),
        Event::Failed(e) => return Err(status(e)),
    };
    Ok(pb::GenerateResponse { event: Some(ev) })
}

pub fn modality(m: i32) -> Result<Modality, Status> {
    match pb::Modality::try_from(m) {
        Ok(pb::Modality::Vision) => Ok(Modality::Vision),
        Ok(pb::Modality::Audio) => Ok(Modality::Audio),
        _ => Err(Status::invalid_argument(
            "modality must be MODALITY_VISION or MODALITY_AUDIO",
        )),
    }
}

pub fn tower(t: &TowerState) -> pb::Tower {
    pb::Tower {
        modality: match t.modality {
            Modality::Vision => pb::Modality::Vision,
            Modality::Audio => pb::Modality::Audio,
        } as i32,
        available: t.available,
        loaded: t.loaded,
        bytes: t.bytes,
    }
}

/// A slice on offer, as the wire carries it.
pub fn slice(s: crate::core::types::SliceInfo) -> pb::Slice {
    pb::Slice {
        name: s.name,
        active: s.active,
        layers: u32::try_from(s.layers).unwrap_or(u32::MAX),
        ffn_widths: s
            .ffn_widths
            .iter()
            .map(|&w| u32::try_from(w).unwrap_or(u32::MAX))
            .collect(),
        params: s.params,
    }
}

pub fn cached_prompt(p: &gemmad_engine::PinnedPrompt) -> pb::CachedPrompt {
    pb::CachedPrompt {
        key: p.key.clone(),
        tokens: u32::try_from(p.tokens).unwrap_or(u32::MAX),
        shared: p.owner.shared,
        uid: if p.owner.shared { None } else { p.owner.user },
        slice: p.slice.clone(),
        ram_bytes: p.ram_bytes,
        on_disk: p.on_disk,
    }
}

pub fn prompt_cache(c: &gemmad_engine::PromptCacheState) -> pb::PromptCacheInfo {
    pb::PromptCacheInfo {
        enabled: c.enabled,
        ram_bytes: c.ram_bytes,
        ram_budget: c.ram_budget,
        entries: u32::try_from(c.entries).unwrap_or(u32::MAX),
        disk_bytes: c.disk_bytes,
        disk_budget: c.disk_budget,
        disk_entries: u32::try_from(c.disk_entries).unwrap_or(u32::MAX),
        hits: c.hits,
        reused_tokens: c.reused_tokens,
        pinned: c.pinned.iter().map(cached_prompt).collect(),
    }
}

/// A Pull step on the wire.
pub fn pull_progress(u: crate::core::pull::PullUpdate) -> pb::PullProgress {
    pb::PullProgress {
        commit: u.commit,
        file: u.file,
        file_bytes: u.file_bytes,
        file_size: u.file_size,
        done_bytes: u.done_bytes,
        total_bytes: u.total_bytes,
        message: u.message,
        installed_dir: u
            .installed_dir
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        already_installed: u.already_installed,
    }
}

/// The status a failed pull ends its stream with (the message is the hub error's, which
/// names the repo, file or URL and what to do).
pub fn pull_status(e: gemmad_hub::Error) -> Status {
    use gemmad_hub::Error as E;
    let m = e.to_string();
    match e {
        E::BadRepoId(_) => Status::invalid_argument(m),
        E::NotFound { .. } | E::ModelNotFound { .. } => Status::not_found(m),
        E::Gated { .. } | E::Offline { .. } | E::Incomplete { .. } => {
            Status::failed_precondition(m)
        }
        E::Integrity { .. } => Status::data_loss(m),
        E::Busy { .. } => Status::aborted(m),
        E::Cancelled(_) => Status::cancelled(m),
        E::Network { .. } | E::Status { .. } | E::Protocol { .. } => Status::unavailable(m),
        E::Io { .. } => Status::internal(m),
    }
}
