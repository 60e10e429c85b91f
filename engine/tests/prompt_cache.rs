//! The prompt cache on the tiny fixture (sliding window 8, KV-shared layers): a request
//! resumed from a kept state gives the same bits as a cold prefill of the same prompt,
//! for prompts sharing none, some and all of their tokens with earlier ones, across the
//! window boundary, in f32 and f16 (Q4_0) caches; users do not see each other's states;
//! pinned prompts survive a restart through the disk tier, and a corrupt or stale file is
//! ignored; the RAM budget holds and the governor's drop empties it.

mod common;

use std::path::Path;

use common::*;
use gemmad_engine::*;

fn load(quant: QuantType, cache: PromptCacheOptions, dir: Option<&Path>) -> Engine {
    Engine::load(
        &fixture("text"),
        LoadOptions {
            quant,
            threads: Some(2),
            cache_dir: dir.map(Path::to_path_buf),
            ple: PleMode::Table,
            prompt_cache: cache,
            ..Default::default()
        },
    )
    .unwrap()
}

fn on(ram_bytes: usize) -> PromptCacheOptions {
    PromptCacheOptions {
        enabled: true,
        ram_bytes,
        disk_bytes: 0,
        min_tokens: 4,
        disk_min_tokens: 16,
    }
}

fn off() -> PromptCacheOptions {
    PromptCacheOptions {
        enabled: false,
        ..on(0)
    }
}

/// What a run produced: the logits before each sample (bits), the tokens, the cached
/// prompt tokens.
#[derive(Debug, PartialEq)]
struct Run {
    logits: Vec<Vec<u32>>,
    tokens: Vec<u32>,
    cached: usize,
}

fn run(e: &mut Engine, prompt: &[u32], n: usize, user: Option<u32>) -> Run {
    run_prompt(e, Prompt::Ids(prompt.to_vec()), n, user)
}

fn run_prompt(e: &mut Engine, prompt: Prompt, n: usize, user: Option<u32>) -> Run {
    let req = GenerateRequest {
        sampling: SamplingParams::greedy(),
        max_tokens: n,
        ignore_eos: true,
        user,
        ..GenerateRequest::new(prompt)
    };
    let mut g = e.start(&req).unwrap();
    let mut logits = Vec::new();
    loop {
        let bits: Vec<u32> = e.last_logits().iter().map(|v| v.to_bits()).collect();
        match e.step(&mut g).unwrap() {
            Step::Token { .. } => logits.push(bits),
            Step::Done { output, .. } => {
                return Run {
                    logits,
                    tokens: output.token_ids,
                    cached: output.usage.cached_tokens,
                }
            }
        }
    }
}

fn pin(e: &mut Engine, ids: &[u32], user: Option<u32>, shared: bool, persist: bool) {
    e.control(&Control::CachePrompt {
        ids: ids.to_vec(),
        user,
        shared,
        persist,
    })
    .unwrap();
}

fn ids(range: std::ops::Range<u32>, salt: u32) -> Vec<u32> {
    range.map(|i| 3 + (i * 37 + salt * 101) % 500).collect()
}

/// Runs `prompt` on the warm engine and on a cold one; they must agree bit for bit.
fn check(warm: &mut Engine, cold: &mut Engine, prompt: &[u32], user: Option<u32>) -> Run {
    let w = run(warm, prompt, 6, user);
    let c = run(cold, prompt, 6, user);
    assert_eq!(c.cached, 0);
    assert_eq!(w.tokens, c.tokens, "tokens (cached {})", w.cached);
    assert!(
        w.logits == c.logits,
        "logits differ from a cold prefill (cached {})",
        w.cached
    );
    w
}

#[test]
fn resumed_prompts_give_the_bits_of_a_cold_prefill() {
    for quant in [QuantType::Bf16, QuantType::Q4_0] {
        let mut warm = load(quant, on(64 << 20), None);
        let mut cold = load(quant, off(), None);
        // 30 tokens: the ring of 8 has wrapped.
        let p1 = ids(0..30, 1);
        let a = check(&mut warm, &mut cold, &p1, None);
        assert_eq!(a.cached, 0, "{quant:?}: nothing kept yet");
        // The next turn: the whole sequence so far (the last sampled token was never
        // run), then new text.
        let mut p2 = p1.clone();
        p2.extend_from_slice(&a.tokens[..5]);
        p2.extend(ids(0..10, 2));
        let b = check(&mut warm, &mut cold, &p2, None);
        assert_eq!(b.cached, 35, "{quant:?}: all tokens shared");
        // Shares 20 tokens, more than a window back from any snapshot: prefilled.
        let mut p3 = p1[..20].to_vec();
        p3.extend(ids(0..10, 3));
        let c = check(&mut warm, &mut cold, &p3, None);
        assert_eq!(c.cached, 0, "{quant:?}: no ring holds position 20's window");
        // The first prompt again (a regenerated answer): the kept state's prompt-end
        // snapshot resumes all but its last token, past the window.
        let d = check(&mut warm, &mut cold, &p1, None);
        assert_eq!(d.cached, 29, "{quant:?}: prompt-end snapshot");
        // Two tokens before that snapshot its ring has lost one key the window needs.
        let mut p5 = p1[..28].to_vec();
        p5.extend(ids(0..5, 6));
        let e5 = check(&mut warm, &mut cold, &p5, None);
        assert_eq!(
            e5.cached, 0,
            "{quant:?}: the ring no longer holds the window"
        );
        // Inside the first window any shared prefix resumes.
        let p6 = ids(0..6, 4);
        check(&mut warm, &mut cold, &p6, None);
        let mut p7 = p6[..4].to_vec();
        p7.extend(ids(0..3, 5));
        let f = check(&mut warm, &mut cold, &p7, None);
        assert_eq!(
            f.cached, 4,
            "{quant:?}: some tokens shared, before the window"
        );
        // Another user sees none of it; the first one still finds its state.
        let g = check(&mut warm, &mut cold, &p2, Some(1234));
        assert_eq!(g.cached, 0, "{quant:?}: another user's state");
        let h = check(&mut warm, &mut cold, &p2, None);
        assert_eq!(
            h.cached, 44,
            "{quant:?}: kept across another user's request"
        );
        // Off for one request: prefilled, same bits.
        let req = GenerateRequest {
            sampling: SamplingParams::greedy(),
            max_tokens: 3,
            ignore_eos: true,
            cache_prompt: false,
            ..GenerateRequest::new(Prompt::Ids(p2.clone()))
        };
        let out = warm
            .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(out.usage.cached_tokens, 0);
        assert_eq!(out.token_ids, h.tokens[..3]);
        let st = warm.state().prompt_cache;
        assert!(
            st.hits >= 4 && st.reused_tokens >= 35 + 29 + 4 + 44,
            "{st:?}"
        );
    }
}

#[test]
fn the_ram_budget_holds_and_the_governor_drop_empties_it() {
    let mut probe = load(QuantType::Bf16, on(64 << 20), None);
    let a = ids(0..40, 7);
    run(&mut probe, &a, 2, None);
    run(&mut probe, &ids(0..40, 8), 2, None);
    let one = probe.state().prompt_cache.ram_bytes;
    assert!(one > 0);
    // Room for about two such states.
    let budget = (one as usize) * 5 / 2;
    let mut e = load(QuantType::Bf16, on(budget), None);
    for salt in 10..20 {
        run(&mut e, &ids(0..40, salt), 2, Some(salt));
        let st = e.state().prompt_cache;
        assert!(st.entries <= 3, "{st:?}");
        let report = e.memory_report();
        let part = report.part(Part::PromptCache).unwrap();
        assert_eq!(part.heap_bytes, st.ram_bytes);
    }
    let st = e.state().prompt_cache;
    assert!(st.entries >= 1, "{st:?}");
    // The most recent users' states are the ones kept; resuming one while the running
    // sequence is kept (evicting the oldest) restores the right one.
    let mut cold = load(QuantType::Bf16, off(), None);
    let r = check(&mut e, &mut cold, &ids(0..40, 18), Some(18));
    assert_eq!(r.cached, 39);
    e.control(&Control::DropPromptCache).unwrap();
    let st = e.state().prompt_cache;
    assert_eq!(st.entries, 0);
    assert_eq!(st.ram_bytes, 0);
    let r = run(&mut e, &ids(0..40, 17), 2, Some(17));
    assert_eq!(r.cached, 0);
}

#[test]
fn pinned_prompts_are_per_user_unless_shared() {
    let mut e = load(QuantType::Bf16, on(64 << 20), None);
    let mut cold = load(QuantType::Bf16, off(), None);
    let system = ids(0..24, 30);
    let mut ask = system.clone();
    ask.extend(ids(0..6, 31));
    pin(&mut e, &system, Some(1000), false, false);
    let st = e.state().prompt_cache;
    assert_eq!(st.pinned.len(), 1, "{st:?}");
    assert_eq!(st.pinned[0].tokens, 24);
    assert_eq!(st.pinned[0].key, prompt_key("full", &system));
    // Clear the running sequence's own copy: only the pinned entry can serve.
    run(&mut e, &ids(0..10, 32), 1, Some(1000));
    assert_eq!(check(&mut e, &mut cold, &ask, Some(1001)).cached, 0);
    run(&mut e, &ids(0..10, 33), 1, Some(1000));
    assert_eq!(check(&mut e, &mut cold, &ask, Some(1000)).cached, 24);
    // Another user may not drop it; its owner may.
    let err = e
        .control(&Control::DropCachedPrompt {
            key: st.pinned[0].key.clone(),
            user: Some(1001),
            admin: false,
        })
        .unwrap_err();
    assert!(err.to_string().contains("no cached prompt"), "{err}");
    e.control(&Control::DropCachedPrompt {
        key: st.pinned[0].key.clone(),
        user: Some(1000),
        admin: false,
    })
    .unwrap();
    assert!(e.state().prompt_cache.pinned.is_empty());
    // Shared by an administrator: everyone resumes it, in one entry.
    pin(&mut e, &system, None, true, false);
    for user in [2000, 2001] {
        run(&mut e, &ids(0..10, 34 + user), 1, Some(user));
        assert_eq!(check(&mut e, &mut cold, &ask, Some(user)).cached, 24);
    }
}

#[test]
fn pinned_prompts_survive_a_restart_and_bad_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let opts = PromptCacheOptions {
        disk_bytes: 256 << 20,
        ..on(64 << 20)
    };
    let system = ids(0..40, 40);
    let mut ask = system.clone();
    ask.extend(ids(0..10, 41));
    for quant in [QuantType::Bf16, QuantType::Q4_0] {
        let sub = dir.path().join(format!("{quant:?}"));
        let mut cold = load(quant, off(), None);
        {
            let mut e = load(quant, opts.clone(), Some(&sub));
            pin(&mut e, &system, None, true, true);
            e.flush_prompt_cache();
            let st = e.state().prompt_cache;
            assert_eq!(st.pinned.len(), 1, "{st:?}");
            assert!(st.pinned[0].on_disk && st.disk_entries == 1, "{st:?}");
            assert!(st.disk_bytes > 0 && st.disk_bytes <= st.disk_budget);
        }
        let files: Vec<_> = std::fs::read_dir(sub.join("prompt-cache"))
            .unwrap()
            .map(|f| f.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let file = &files[0];
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "state files hold users' text");
        // A restart: the state comes back from the file, same bits as a prefill.
        {
            let mut e = load(quant, opts.clone(), Some(&sub));
            assert_eq!(e.state().prompt_cache.pinned.len(), 1);
            let r = check(&mut e, &mut cold, &ask, Some(5));
            assert_eq!(r.cached, 40, "{quant:?}: resumed from the file");
        }
        // A flipped byte in the data: detected, ignored, removed; the answer is right.
        let mut bytes = std::fs::read(file).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x5a;
        std::fs::write(file, &bytes).unwrap();
        {
            let mut e = load(quant, opts.clone(), Some(&sub));
            let r = check(&mut e, &mut cold, &ask, Some(5));
            assert_eq!(r.cached, 0, "{quant:?}: a corrupt file is not used");
            assert!(!file.exists(), "the corrupt file is removed");
        }
        // A file made by another checkpoint (its key differs): stale, removed at start.
        {
            let mut e = load(quant, opts.clone(), Some(&sub));
            pin(&mut e, &system, None, true, true);
            e.flush_prompt_cache();
        }
        let mut bytes = std::fs::read(file).unwrap();
        let text = String::from_utf8_lossy(&bytes[16..200]).into_owned();
        let k = text.find("\"checkpoint\":\"").unwrap() + 16 + 14;
        bytes[k] = if bytes[k] == b'0' { b'1' } else { b'0' };
        std::fs::write(file, &bytes).unwrap();
        let e = load(quant, opts.clone(), Some(&sub));
        assert!(e.state().prompt_cache.pinned.is_empty());
        assert!(!file.exists(), "the stale file is removed");
    }
}

/// Runs a chat on `e` (greedy, as `run`), through a prompt prepared as the daemon does.
fn run_chat(e: &mut Engine, msgs: &[(&str, &str)], user: Option<u32>) -> Run {
    let chat = || Prompt::Chat(msgs.iter().map(|(r, t)| ChatMessage::text(r, t)).collect());
    let prepared = e.prompter().prepare(&chat()).unwrap();
    assert_eq!(prepared.ids(), &e.prompt_ids(&chat()).unwrap()[..]);
    run_prompt(e, Prompt::Prepared(prepared), 6, user)
}

#[test]
fn another_conversation_resumes_the_shared_system_prompt() {
    let mut warm = load(QuantType::Q4_0, on(64 << 20), None);
    let mut cold = load(QuantType::Q4_0, off(), None);
    let system = "you are a careful assistant who answers every question about rivers";
    let prefix = warm
        .prompter()
        .prefix_ids(&[ChatMessage::text("system", system)])
        .unwrap();
    assert!(prefix.len() > 8, "past the window: {}", prefix.len());
    let conv = |q| [("system", system), ("user", q)];
    let prepared = warm
        .prompter()
        .prepare(&Prompt::Chat(
            conv("where does the nile start?")
                .iter()
                .map(|(r, t)| ChatMessage::text(r, t))
                .collect(),
        ))
        .unwrap();
    let end = prepared
        .system_end()
        .expect("a system prompt's end is marked");
    assert!(
        end + 2 >= prefix.len() && end <= prefix.len(),
        "{end} vs {}",
        prefix.len()
    );
    let a = run_chat(&mut warm, &conv("where does the nile start?"), None);
    assert_eq!(a.cached, 0);
    // A different question after the same system prompt: resumed where it ends, same bits.
    let b = run_chat(&mut warm, &conv("how long is the amazon river?"), None);
    let c = run_chat(&mut cold, &conv("how long is the amazon river?"), None);
    assert_eq!(b.cached, end, "resumed at the system prompt's end");
    assert_eq!(b.tokens, c.tokens);
    assert!(b.logits == c.logits, "logits differ from a cold prefill");
    // The first conversation was kept when the second left it: its next turn resumes.
    let st = warm.state().prompt_cache;
    assert!(st.entries >= 1, "{st:?}");
}
