//! Replies read back: message bodies and their `a{sv}` dicts as `pb` statuses, slices,
//! towers and Finished events, a wrong type named by its key.

use std::collections::HashMap;

use zbus::{Message, OwnedVariant, Variant};

use crate::{pb, ClientError};

pub(super) fn bad_reply(what: &str, reason: String) -> ClientError {
    ClientError::BadReply {
        what: what.to_string(),
        reason,
    }
}

pub(super) fn deserialize<T>(msg: &Message, what: &str) -> Result<T, ClientError>
where
    T: for<'d> zbus::wire::DynamicDeserialize<'d>,
{
    let body = msg.body();
    body.deserialize::<T>().map_err(|e| {
        bad_reply(
            what,
            format!("a body of type `{}` does not read: {e}", body.signature()),
        )
    })
}

/// A reply's `a{sv}`, read key by key. Missing keys read as the protobuf default (a newer
/// or older gemmad may lack or add some); a key of the wrong type is an error naming it.
pub(crate) struct Fields<'a> {
    at: String,
    map: HashMap<&'a str, &'a Variant<'a>>,
}

/// A variant's value without the variant wrappers around it.
pub(super) fn unwrap<'a>(mut v: &'a Variant<'a>) -> &'a Variant<'a> {
    while let Variant::Variant(inner) = v {
        v = inner;
    }
    v
}

impl<'a> Fields<'a> {
    pub(crate) fn from_map(at: &str, m: &'a HashMap<String, OwnedVariant>) -> Fields<'a> {
        Fields {
            at: at.to_string(),
            map: m.iter().map(|(k, v)| (k.as_str(), &**v)).collect(),
        }
    }

    fn from_variant(at: String, v: &'a Variant<'a>) -> Result<Fields<'a>, ClientError> {
        let Variant::Dict(d) = unwrap(v) else {
            return Err(bad_reply(
                &at,
                format!("is {}, expected a{{sv}}", unwrap(v).value_signature()),
            ));
        };
        let mut map = HashMap::new();
        for (k, v) in d.iter() {
            let Variant::Str(k) = k else {
                return Err(bad_reply(
                    &at,
                    format!("has a key of type {}, expected s", k.value_signature()),
                ));
            };
            map.insert(k.as_str(), v);
        }
        Ok(Fields { at, map })
    }

    fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    fn key_at(&self, key: &str) -> String {
        format!("{}: `{key}`", self.at)
    }

    fn wrong(&self, key: &str, v: &Variant<'_>, expected: &str) -> ClientError {
        bad_reply(
            &self.at,
            format!("`{key}` is {}, expected {expected}", v.value_signature()),
        )
    }

    fn get<T>(
        &self,
        key: &str,
        expected: &str,
        pick: impl Fn(&'a Variant<'a>) -> Option<T>,
    ) -> Result<Option<T>, ClientError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => pick(unwrap(v))
                .map(Some)
                .ok_or_else(|| self.wrong(key, unwrap(v), expected)),
        }
    }

    fn str(&self, key: &str) -> Result<String, ClientError> {
        Ok(self
            .get(key, "s", |v| match v {
                Variant::Str(s) => Some(s.as_str().to_string()),
                _ => None,
            })?
            .unwrap_or_default())
    }

    fn u32(&self, key: &str) -> Result<u32, ClientError> {
        Ok(self
            .get(key, "u", |v| match v {
                Variant::U32(x) => Some(*x),
                _ => None,
            })?
            .unwrap_or_default())
    }

    /// A `u` that may be absent (`None`), as opposed to 0.
    fn opt_u32(&self, key: &str) -> Result<Option<u32>, ClientError> {
        self.get(key, "u", |v| match v {
            Variant::U32(x) => Some(*x),
            _ => None,
        })
    }

    fn u64(&self, key: &str) -> Result<u64, ClientError> {
        Ok(self
            .get(key, "t", |v| match v {
                Variant::U64(x) => Some(*x),
                _ => None,
            })?
            .unwrap_or_default())
    }

    fn f64(&self, key: &str) -> Result<f64, ClientError> {
        Ok(self
            .get(key, "d", |v| match v {
                Variant::F64(x) => Some(*x),
                _ => None,
            })?
            .unwrap_or_default())
    }

    fn bool(&self, key: &str) -> Result<bool, ClientError> {
        Ok(self
            .get(key, "b", |v| match v {
                Variant::Bool(x) => Some(*x),
                _ => None,
            })?
            .unwrap_or_default())
    }

    fn array(&self, key: &str, expected: &str) -> Result<&'a [Variant<'a>], ClientError> {
        Ok(self
            .get(key, expected, |v| match v {
                Variant::Array(a) if a.element_signature().to_string() == expected[1..] => {
                    Some(&a[..])
                }
                _ => None,
            })?
            .unwrap_or_default())
    }

    fn strs(&self, key: &str) -> Result<Vec<String>, ClientError> {
        self.array(key, "as")?
            .iter()
            .map(|v| match unwrap(v) {
                Variant::Str(s) => Ok(s.as_str().to_string()),
                other => Err(self.wrong(key, other, "as")),
            })
            .collect()
    }

    fn u32s(&self, key: &str) -> Result<Vec<u32>, ClientError> {
        self.array(key, "au")?
            .iter()
            .map(|v| match unwrap(v) {
                Variant::U32(x) => Ok(*x),
                other => Err(self.wrong(key, other, "au")),
            })
            .collect()
    }

    fn dict(&self, key: &str) -> Result<Option<Fields<'a>>, ClientError> {
        self.map
            .get(key)
            .map(|v| Fields::from_variant(self.key_at(key), v))
            .transpose()
    }

    fn dicts(&self, key: &str) -> Result<Vec<Fields<'a>>, ClientError> {
        self.array(key, "aa{sv}")?
            .iter()
            .enumerate()
            .map(|(i, v)| Fields::from_variant(format!("{}[{i}]", self.key_at(key)), v))
            .collect()
    }

    /// An `a{st}` in a stable order: `process_rss` and `kv_cache` first, as gRPC's Status
    /// lists them, then the rest by name (a D-Bus dict read back has lost its order).
    fn u64_map(&self, key: &str) -> Result<Vec<(String, u64)>, ClientError> {
        let Some(v) = self.map.get(key) else {
            return Ok(Vec::new());
        };
        let Variant::Dict(d) = unwrap(v) else {
            return Err(self.wrong(key, unwrap(v), "a{st}"));
        };
        let mut out = Vec::new();
        for (k, x) in d.iter() {
            match (unwrap(k), unwrap(x)) {
                (Variant::Str(k), Variant::U64(x)) => out.push((k.as_str().to_string(), *x)),
                _ => return Err(self.wrong(key, unwrap(v), "a{st}")),
            }
        }
        out.sort_by_key(|(k, _)| {
            let rank = ["process_rss", "kv_cache"]
                .iter()
                .position(|p| p == k)
                .unwrap_or(2);
            (rank, k.clone())
        });
        Ok(out)
    }

    fn readings(&self, key: &str) -> Result<Vec<pb::Reading>, ClientError> {
        self.array(key, "a(sds)")?
            .iter()
            .map(|v| {
                let Variant::Structure(s) = unwrap(v) else {
                    return Err(self.wrong(key, unwrap(v), "a(sds)"));
                };
                match s.fields() {
                    [Variant::Str(name), Variant::F64(value), Variant::Str(unit)] => {
                        Ok(pb::Reading {
                            name: name.as_str().to_string(),
                            value: *value,
                            unit: unit.as_str().to_string(),
                        })
                    }
                    _ => Err(self.wrong(key, v, "a(sds)")),
                }
            })
            .collect()
    }
}

fn modality_from_name(s: &str) -> pb::Modality {
    match s {
        "vision" => pb::Modality::Vision,
        "audio" => pb::Modality::Audio,
        _ => pb::Modality::Unspecified,
    }
}

pub(crate) fn tower_from_fields(f: &Fields<'_>) -> Result<pb::Tower, ClientError> {
    Ok(pb::Tower {
        modality: modality_from_name(&f.str("modality")?) as i32,
        available: f.bool("available")?,
        loaded: f.bool("loaded")?,
        bytes: f.u64("bytes")?,
    })
}

pub(super) type SliceArgs = (String, u32, HashMap<String, OwnedVariant>);

pub(crate) fn slice_from_args(s: &SliceArgs, at: &str) -> Result<pb::Slice, ClientError> {
    let f = Fields::from_map(at, &s.2);
    Ok(pb::Slice {
        name: s.0.clone(),
        layers: s.1,
        active: f.bool("active")?,
        ffn_widths: f.u32s("ffn_widths")?,
        params: f.u64("params")?,
    })
}

/// A pinned prompt's dict (CachePrompt's reply, `prompt_cache.pinned`) as pb's.
pub(crate) fn cached_prompt_from_fields(f: &Fields<'_>) -> Result<pb::CachedPrompt, ClientError> {
    Ok(pb::CachedPrompt {
        key: f.str("key")?,
        tokens: f.u32("tokens")?,
        shared: f.bool("shared")?,
        uid: f.opt_u32("uid")?,
        slice: f.str("slice")?,
        ram_bytes: f.u64("ram_bytes")?,
        on_disk: f.bool("on_disk")?,
    })
}

/// GetStatus's dict as gRPC's StatusResponse.
pub(crate) fn status_from_dict(
    map: &HashMap<String, OwnedVariant>,
) -> Result<pb::StatusResponse, ClientError> {
    let f = Fields::from_map("GetStatus", map);
    let model = f
        .dict("model")?
        .map(|m| -> Result<_, ClientError> {
            Ok(pb::ModelInfo {
                dir: m.str("dir")?,
                model_type: m.str("model_type")?,
                layers: m.u32("layers")?,
                hidden_size: m.u32("hidden_size")?,
                vocab_size: m.u32("vocab_size")?,
                context_tokens: m.u32("context_tokens")?,
                quant: m.str("quant")?,
                kernels: m.str("kernels")?,
                threads: m.u32("threads")?,
                isa: m.str("isa")?,
                pack: m.bool("pack")?,
            })
        })
        .transpose()?;
    let queue = f
        .dict("queue")?
        .map(|q| -> Result<_, ClientError> {
            Ok(pb::QueueInfo {
                waiting: q.u32("waiting")?,
                waiting_interactive: q.u32("waiting_interactive")?,
                waiting_background: q.u32("waiting_background")?,
                running: q.bool("running")?,
                depth: q.u32("depth")?,
                per_peer: q.u32("per_peer")?,
            })
        })
        .transpose()?;
    let requests = if f.has("requests") {
        let counts: HashMap<String, u64> = f.u64_map("requests")?.into_iter().collect();
        let n = |k: &str| counts.get(k).copied().unwrap_or_default();
        Some(pb::RequestCounters {
            admitted: n("admitted"),
            completed: n("completed"),
            cancelled: n("cancelled"),
            failed: n("failed"),
            rejected: n("rejected"),
        })
    } else {
        None
    };
    let connections = f
        .dict("connections")?
        .map(|c| -> Result<_, ClientError> {
            Ok(pb::ConnectionCounters {
                open: c.u32("open")?,
                accepted: c.u64("accepted")?,
                refused: c.u64("refused")?,
                over_limit: c.u64("over_limit")?,
                accept_errors: c.u64("accept_errors")?,
                max_per_uid: c.u32("max_per_uid")?,
                max_total: c.u32("max_total")?,
            })
        })
        .transpose()?;
    let governor = f
        .dict("governor")?
        .map(|g| -> Result<_, ClientError> {
            Ok(pb::GovernorInfo {
                tier: g.str("tier")?,
                readings: g.readings("readings")?,
                pinned: g.str("pinned")?,
                last_actions: g.strs("last_actions")?,
                transitions: g.u64("transitions")?,
                actions_applied: g.u64("actions_applied")?,
            })
        })
        .transpose()?;
    // An older gemmad has no prompt cache to report.
    let prompt_cache = f
        .dict("prompt_cache")?
        .map(|c| -> Result<_, ClientError> {
            Ok(pb::PromptCacheInfo {
                enabled: c.bool("enabled")?,
                ram_bytes: c.u64("ram_bytes")?,
                ram_budget: c.u64("ram_budget")?,
                entries: c.u32("entries")?,
                disk_bytes: c.u64("disk_bytes")?,
                disk_budget: c.u64("disk_budget")?,
                disk_entries: c.u32("disk_entries")?,
                hits: c.u64("hits")?,
                reused_tokens: c.u64("reused_tokens")?,
                pinned: c
                    .dicts("pinned")?
                    .iter()
                    .map(cached_prompt_from_fields)
                    .collect::<Result<_, _>>()?,
            })
        })
        .transpose()?;
    Ok(pb::StatusResponse {
        version: f.str("version")?,
        uptime_s: f.f64("uptime_s")?,
        model,
        active_slice: f.str("active_slice")?,
        towers: f
            .dicts("towers")?
            .iter()
            .map(tower_from_fields)
            .collect::<Result<_, _>>()?,
        memory: f
            .u64_map("memory")?
            .into_iter()
            .map(|(part, bytes)| pb::MemoryPart { part, bytes })
            .collect(),
        queue,
        requests,
        governor,
        warnings: f.strs("warnings")?,
        connections,
        prompt_cache,
    })
}

/// Finished's reason and dict as pb's Finished (`None` for a cancelled request) and the
/// request id.
pub(crate) fn finished_from_signal(
    reason: &str,
    f: &Fields<'_>,
) -> Result<(Option<pb::Finished>, u64), ClientError> {
    let id = f.u64("request_id")?;
    let finish_reason = match reason {
        "eos" => pb::FinishReason::Eos,
        "stop" => pb::FinishReason::Stop,
        "length" => pb::FinishReason::Length,
        "context_full" => pb::FinishReason::ContextFull,
        "cancelled" => return Ok((None, id)),
        // A reason this client does not know yet.
        _ => pb::FinishReason::Unspecified,
    };
    let finished = pb::Finished {
        finish_reason: finish_reason as i32,
        usage: Some(pb::Usage {
            prompt_tokens: f.u32("prompt_tokens")?,
            completion_tokens: f.u32("completion_tokens")?,
            // 0 from an older gemmad, which does not send it.
            cached_tokens: f.u32("cached_tokens")?,
        }),
        timings: Some(pb::Timings {
            queue_wait_ms: f.f64("queue_wait_ms")?,
            time_to_first_token_ms: f.f64("time_to_first_token_ms")?,
            prefill_ms: f.f64("prefill_ms")?,
            prefill_tokens_per_s: f.f64("prefill_tokens_per_s")?,
            decode_ms: f.f64("decode_ms")?,
            decode_tokens_per_s: f.f64("decode_tokens_per_s")?,
            active_slice: f.str("active_slice")?,
        }),
    };
    Ok((Some(finished), id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dbus::tests::{dict_of, through_wire};

    fn full_status() -> Message {
        let v = |x: Variant<'static>| x;
        let model: HashMap<&str, Variant> = HashMap::from([
            ("dir", v("/var/lib/gemmad/model".into())),
            ("model_type", v("gemma3n".into())),
            ("layers", v(35u32.into())),
            ("hidden_size", v(2048u32.into())),
            ("vocab_size", v(262144u32.into())),
            ("context_tokens", v(32768u32.into())),
            ("quant", v("q4_0".into())),
            ("kernels", v("avx2".into())),
            ("threads", v(4u32.into())),
            ("isa", v("auto".into())),
            ("pack", v(true.into())),
        ]);
        let tower = |m: &'static str,
                     loaded: bool,
                     bytes: u64|
         -> HashMap<&'static str, Variant<'static>> {
            HashMap::from([
                ("modality", v(m.into())),
                ("available", v(true.into())),
                ("loaded", v(loaded.into())),
                ("bytes", v(bytes.into())),
            ])
        };
        let memory: HashMap<&str, u64> = HashMap::from([
            ("decoder", 100),
            ("kv_cache", 200),
            ("process_rss", 300),
            ("audio_tower", 50),
        ]);
        let queue: HashMap<&str, Variant> = HashMap::from([
            ("waiting", v(3u32.into())),
            ("waiting_interactive", v(2u32.into())),
            ("waiting_background", v(1u32.into())),
            ("depth", v(16u32.into())),
            ("per_peer", v(4u32.into())),
            ("running", v(true.into())),
        ]);
        let requests: HashMap<&str, u64> = HashMap::from([
            ("admitted", 10),
            ("completed", 7),
            ("cancelled", 1),
            ("failed", 1),
            ("rejected", 2),
        ]);
        let connections: HashMap<&str, Variant> = HashMap::from([
            ("open", v(2u32.into())),
            ("max_per_uid", v(8u32.into())),
            ("max_total", v(64u32.into())),
            ("accepted", v(40u64.into())),
            ("refused", v(3u64.into())),
            ("over_limit", v(1u64.into())),
            ("accept_errors", v(0u64.into())),
        ]);
        let governor: HashMap<&str, Variant> = HashMap::from([
            ("tier", v("balanced".into())),
            ("pinned", v("".into())),
            (
                "readings",
                v(vec![("battery", 41.5f64, "%"), ("psi_mem", 0.25, "")].into()),
            ),
            (
                "last_actions",
                v(vec!["balanced: slice E2B (battery 41%)"].into()),
            ),
            ("transitions", v(5u64.into())),
            ("actions_applied", v(9u64.into())),
        ]);
        let pinned = |key: &'static str, shared: bool| -> HashMap<&'static str, Variant<'static>> {
            let mut p = HashMap::from([
                ("key", v(key.into())),
                ("tokens", v(40u32.into())),
                ("shared", v(shared.into())),
                ("slice", v("E4B".into())),
                ("ram_bytes", v(4096u64.into())),
                ("on_disk", v(shared.into())),
            ]);
            if !shared {
                p.insert("uid", v(1000u32.into()));
            }
            p
        };
        let prompt_cache: HashMap<&str, Variant> = HashMap::from([
            ("enabled", v(true.into())),
            ("ram_bytes", v(1u64.into())),
            ("ram_budget", v(2u64.into())),
            ("entries", v(3u32.into())),
            ("disk_bytes", v(4u64.into())),
            ("disk_budget", v(5u64.into())),
            ("disk_entries", v(6u32.into())),
            ("hits", v(7u64.into())),
            ("reused_tokens", v(8u64.into())),
            (
                "pinned",
                v(vec![
                    pinned("0123456789abcdef", false),
                    pinned("fedcba9876543210", true),
                ]
                .into()),
            ),
        ]);
        let status: HashMap<&str, Variant> = HashMap::from([
            ("version", v("0.1.0".into())),
            ("uptime_s", v(12.5f64.into())),
            ("model", v(model.into())),
            ("active_slice", v("E4B".into())),
            (
                "towers",
                v(vec![tower("vision", false, 0), tower("audio", true, 1 << 20)].into()),
            ),
            ("memory", v(memory.into())),
            ("queue", v(queue.into())),
            ("requests", v(requests.into())),
            ("connections", v(connections.into())),
            ("warnings", v(vec!["cache_dir is read-only"].into())),
            ("governor", v(governor.into())),
            ("prompt_cache", v(prompt_cache.into())),
        ]);
        through_wire(&(status,))
    }

    #[test]
    fn status_dict_reads_as_grpc_status() {
        let s = status_from_dict(&dict_of(&full_status())).unwrap();
        assert_eq!(s.version, "0.1.0");
        assert_eq!(s.uptime_s, 12.5);
        assert_eq!(s.active_slice, "E4B");
        assert_eq!(
            s.model,
            Some(pb::ModelInfo {
                dir: "/var/lib/gemmad/model".into(),
                model_type: "gemma3n".into(),
                layers: 35,
                hidden_size: 2048,
                vocab_size: 262144,
                context_tokens: 32768,
                quant: "q4_0".into(),
                kernels: "avx2".into(),
                threads: 4,
                isa: "auto".into(),
                pack: true,
            })
        );
        assert_eq!(
            s.towers,
            [
                pb::Tower {
                    modality: pb::Modality::Vision as i32,
                    available: true,
                    loaded: false,
                    bytes: 0
                },
                pb::Tower {
                    modality: pb::Modality::Audio as i32,
                    available: true,
                    loaded: true,
                    bytes: 1 << 20
                },
            ]
        );
        let memory: Vec<(&str, u64)> = s
            .memory
            .iter()
            .map(|p| (p.part.as_str(), p.bytes))
            .collect();
        assert_eq!(
            memory,
            [
                ("process_rss", 300),
                ("kv_cache", 200),
                ("audio_tower", 50),
                ("decoder", 100)
            ]
        );
        assert_eq!(
            s.queue,
            Some(pb::QueueInfo {
                waiting: 3,
                waiting_interactive: 2,
                waiting_background: 1,
                running: true,
                depth: 16,
                per_peer: 4,
            })
        );
        assert_eq!(
            s.requests,
            Some(pb::RequestCounters {
                admitted: 10,
                completed: 7,
                cancelled: 1,
                failed: 1,
                rejected: 2,
            })
        );
        assert_eq!(
            s.connections,
            Some(pb::ConnectionCounters {
                open: 2,
                accepted: 40,
                refused: 3,
                over_limit: 1,
                accept_errors: 0,
                max_per_uid: 8,
                max_total: 64,
            })
        );
        assert_eq!(s.warnings, ["cache_dir is read-only"]);
        let g = s.governor.expect("governor");
        assert_eq!(g.tier, "balanced");
        assert_eq!(g.pinned, "");
        assert_eq!(g.transitions, 5);
        assert_eq!(g.actions_applied, 9);
        assert_eq!(g.last_actions, ["balanced: slice E2B (battery 41%)"]);
        assert_eq!(
            g.readings,
            [
                pb::Reading {
                    name: "battery".into(),
                    value: 41.5,
                    unit: "%".into()
                },
                pb::Reading {
                    name: "psi_mem".into(),
                    value: 0.25,
                    unit: "".into()
                },
            ]
        );
    }

    #[test]
    fn status_reads_the_prompt_cache() {
        let s = status_from_dict(&dict_of(&full_status())).unwrap();
        let mine = pb::CachedPrompt {
            key: "0123456789abcdef".into(),
            tokens: 40,
            shared: false,
            uid: Some(1000),
            slice: "E4B".into(),
            ram_bytes: 4096,
            on_disk: false,
        };
        let shared = pb::CachedPrompt {
            key: "fedcba9876543210".into(),
            shared: true,
            uid: None,
            on_disk: true,
            ..mine.clone()
        };
        assert_eq!(
            s.prompt_cache,
            Some(pb::PromptCacheInfo {
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
            })
        );

        let bad: HashMap<&str, Variant> = HashMap::from([("uid", Variant::from(1000u64))]);
        let pc: HashMap<&str, Variant> = HashMap::from([("pinned", Variant::from(vec![bad]))]);
        let wrong: HashMap<&str, Variant> = HashMap::from([("prompt_cache", Variant::from(pc))]);
        let e = status_from_dict(&dict_of(&through_wire(&(wrong,)))).unwrap_err();
        match &e {
            ClientError::BadReply { what, reason } => {
                assert_eq!(what, "GetStatus: `prompt_cache`: `pinned`[0]");
                assert_eq!(reason, "`uid` is t, expected u");
            }
            other => panic!("got {other:?}"),
        }
    }

    #[test]
    fn status_without_governor_and_with_wrong_types() {
        let mut d = dict_of(&full_status());
        d.remove("governor");
        d.remove("warnings");
        d.remove("prompt_cache");
        let s = status_from_dict(&d).unwrap();
        assert_eq!(s.governor, None);
        assert!(s.warnings.is_empty());
        // An older gemmad: no prompt cache reported.
        assert_eq!(s.prompt_cache, None);

        let queue: HashMap<&str, Variant> = HashMap::from([("waiting", Variant::from(3u64))]);
        let wrong: HashMap<&str, Variant> = HashMap::from([("queue", Variant::from(queue))]);
        let e = status_from_dict(&dict_of(&through_wire(&(wrong,)))).unwrap_err();
        match &e {
            ClientError::BadReply { what, reason } => {
                assert_eq!(what, "GetStatus: `queue`");
                assert_eq!(reason, "`waiting` is t, expected u");
            }
            other => panic!("got {other:?}"),
        }

        let wrong: HashMap<&str, Variant> = HashMap::from([("memory", Variant::from(vec![1u32]))]);
        let e = status_from_dict(&dict_of(&through_wire(&(wrong,)))).unwrap_err();
        assert!(
            e.to_string().contains("`memory` is au, expected a{st}"),
            "{e}"
        );
    }

    #[test]
    fn finished_signal_reads_usage_and_timings() {
        let usage: HashMap<&str, Variant> = HashMap::from([
            ("request_id", Variant::from(42u64)),
            ("prompt_tokens", 12u32.into()),
            ("completion_tokens", 30u32.into()),
            ("cached_tokens", 9u32.into()),
            ("queue_wait_ms", 1.5f64.into()),
            ("time_to_first_token_ms", 80.0f64.into()),
            ("prefill_ms", 70.0f64.into()),
            ("prefill_tokens_per_s", 171.4f64.into()),
            ("decode_ms", 900.0f64.into()),
            ("decode_tokens_per_s", 33.3f64.into()),
            ("active_slice", "E2B".into()),
        ]);
        let msg = through_wire(&("stop", usage));
        let (reason, map): (String, HashMap<String, OwnedVariant>) =
            deserialize(&msg, "Finished").unwrap();
        let (f, id) = finished_from_signal(&reason, &Fields::from_map("Finished", &map)).unwrap();
        assert_eq!(id, 42);
        assert_eq!(
            f,
            Some(pb::Finished {
                finish_reason: pb::FinishReason::Stop as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: 12,
                    completion_tokens: 30,
                    cached_tokens: 9,
                }),
                timings: Some(pb::Timings {
                    queue_wait_ms: 1.5,
                    time_to_first_token_ms: 80.0,
                    prefill_ms: 70.0,
                    prefill_tokens_per_s: 171.4,
                    decode_ms: 900.0,
                    decode_tokens_per_s: 33.3,
                    active_slice: "E2B".into(),
                }),
            })
        );
        let fields = Fields::from_map("Finished", &map);
        for (reason, want) in [
            ("eos", pb::FinishReason::Eos),
            ("length", pb::FinishReason::Length),
            ("context_full", pb::FinishReason::ContextFull),
            ("novel", pb::FinishReason::Unspecified),
        ] {
            let (f, _) = finished_from_signal(reason, &fields).unwrap();
            assert_eq!(f.unwrap().finish_reason, want as i32, "{reason}");
        }
        assert_eq!(
            finished_from_signal("cancelled", &fields).unwrap(),
            (None, 42)
        );
        // An older gemmad sends no cached_tokens: 0.
        let mut older = map.clone();
        older.remove("cached_tokens");
        let (f, _) = finished_from_signal("stop", &Fields::from_map("Finished", &older)).unwrap();
        let u = f.unwrap().usage.unwrap();
        assert_eq!((u.prompt_tokens, u.cached_tokens), (12, 0));
    }

    /// docs/dbus.md writes SetSlice's and TokenizeWith's replies as `(...)`; whether gemmad
    /// sends separate arguments or one struct, they read the same.
    #[test]
    fn replies_read_as_args_or_as_one_struct() {
        let attrs = || -> HashMap<&'static str, Variant<'static>> {
            HashMap::from([
                ("params", Variant::from(1_910_000_000u64)),
                ("active", true.into()),
                ("ffn_widths", vec![8192u32, 8192, 16384].into()),
            ])
        };
        let want = pb::Slice {
            name: "E2B".into(),
            active: true,
            layers: 30,
            ffn_widths: vec![8192, 8192, 16384],
            params: 1_910_000_000,
        };
        let as_args = through_wire(&("E2B", 30u32, attrs()));
        let as_struct = through_wire(&(("E2B", 30u32, attrs()),));
        let has = |m: &Message, s: &[u8]| m.data().windows(s.len()).any(|w| w == s);
        // The header's signatures differ on the wire.
        assert!(has(&as_struct, b"(sua{sv})\0"));
        assert!(!has(&as_args, b"(sua{sv})\0") && has(&as_args, b"sua{sv}\0"));
        for m in [&as_args, &as_struct] {
            let s: SliceArgs = deserialize(m, "SetSlice").unwrap();
            assert_eq!(slice_from_args(&s, "SetSlice").unwrap(), want);
        }
        let list = through_wire(&(vec![("E2B", 30u32, attrs())],));
        let slices: Vec<SliceArgs> = deserialize(&list, "ListSlices").unwrap();
        assert_eq!(slice_from_args(&slices[0], "ListSlices[0]").unwrap(), want);

        for m in [
            through_wire(&(vec![2u32, 105], 32768u32)),
            through_wire(&((vec![2u32, 105], 32768u32),)),
        ] {
            let (ids, ctx): (Vec<u32>, u32) = deserialize(&m, "TokenizeWith").unwrap();
            assert_eq!((ids, ctx), (vec![2, 105], 32768));
        }
        let e = deserialize::<(Vec<u32>, u32)>(&through_wire(&("x",)), "TokenizeWith").unwrap_err();
        match e {
            ClientError::BadReply { what, reason } => {
                assert_eq!(what, "TokenizeWith");
                assert!(
                    reason.starts_with("a body of type `s` does not read"),
                    "{reason}"
                );
            }
            other => panic!("got {other:?}"),
        }
    }
}
