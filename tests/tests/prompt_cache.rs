//! The prompt cache end to end: the real daemon on the fixture, driven through
//! gemmad-client and gemmactl. A stateless multi-turn chat resumes each turn from the
//! previous one and gives the tokens a daemon without the cache gives; a pinned, shared
//! system prompt serves other conversations and survives a restart through the disk
//! tier; gemmactl pins, lists and drops.

use gemmad_client::{message, pb, text_part, Client, Generation};
use gemmad_e2e::Daemon;

fn start(extra: &str) -> Daemon {
    Daemon::start(&format!("[model]\nthreads = 1\n{extra}")).expect("starting gemmad")
}

fn request(messages: Vec<pb::Message>, seed: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages,
        sampling: Some(pb::Sampling {
            seed: Some(seed),
            ..Default::default()
        }),
        max_tokens: 12,
        ..Default::default()
    }
}

fn usage(g: &Generation) -> pb::Usage {
    g.finished
        .clone()
        .and_then(|f| f.usage)
        .expect("a finished request has usage")
}

async fn chat(c: &mut Client, system: Option<&str>, turns: &[&str]) -> Vec<Generation> {
    let mut history: Vec<pb::Message> = system
        .map(|s| message("system", vec![text_part(s)]))
        .into_iter()
        .collect();
    let mut out = Vec::new();
    for (i, t) in turns.iter().enumerate() {
        history.push(message("user", vec![text_part(t)]));
        let g = c
            .generate_text(request(history.clone(), 100 + i as u64))
            .await
            .expect("generate");
        history.push(message("model", vec![text_part(&g.text)]));
        out.push(g);
    }
    out
}

#[tokio::test]
async fn a_stateless_chat_resumes_each_turn_with_the_same_tokens() {
    let warm = start("");
    let cold = start("[cache]\nenabled = false\n");
    let (mut w, mut c) = (warm.client().await.unwrap(), cold.client().await.unwrap());
    let turns = ["hello there", "tell me more", "and then?", "thanks"];
    let a = chat(&mut w, Some("You are terse."), &turns).await;
    let b = chat(&mut c, Some("You are terse."), &turns).await;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x.token_ids, y.token_ids,
            "turn {i}: same tokens with the cache"
        );
        let (ux, uy) = (usage(x), usage(y));
        assert_eq!(ux.prompt_tokens, uy.prompt_tokens);
        assert_eq!(uy.cached_tokens, 0, "turn {i}: the cache is off");
        if i == 0 {
            assert_eq!(ux.cached_tokens, 0);
        } else {
            // At least the previous turn's prompt is resumed (its end was snapshotted).
            let before = usage(&a[i - 1]).prompt_tokens;
            assert!(
                ux.cached_tokens >= before && ux.cached_tokens < ux.prompt_tokens,
                "turn {i}: cached {} of {}, previous prompt {before}",
                ux.cached_tokens,
                ux.prompt_tokens
            );
        }
    }
    // A request that opts out prefills everything and gives the same output.
    let mut history = vec![message("system", vec![text_part("You are terse.")])];
    history.push(message("user", vec![text_part(turns[0])]));
    let mut r = request(history, 100);
    r.cache_prompt = Some(false);
    let g = w.generate_text(r).await.unwrap();
    assert_eq!(usage(&g).cached_tokens, 0);
    assert_eq!(g.token_ids, a[0].token_ids);
    let s = w.status().await.unwrap();
    let p = s.prompt_cache.expect("Status reports the prompt cache");
    // Status agrees with the last Finished at once (published before it is sent).
    let reused: u64 = a.iter().map(|g| u64::from(usage(g).cached_tokens)).sum();
    assert!(
        p.enabled && p.hits == 3 && p.reused_tokens == reused,
        "{p:?}"
    );
    assert!(p.ram_bytes <= p.ram_budget, "{p:?}");
    assert!(
        s.memory.iter().any(|m| m.part == "prompt_cache"),
        "{:?}",
        s.memory
    );
}

#[tokio::test]
async fn a_shared_system_prompt_survives_a_restart_and_gemmactl_manages_it() {
    let cache = tempfile::tempdir().unwrap();
    let config = format!(
        "cache_dir = \"{}\"\n[cache]\ndisk_bytes = 67108864\n",
        cache.path().display()
    );
    let system = "You answer in one word. ".repeat(6);
    let mut first = None;
    for round in 0..2 {
        let d = start(&config);
        let mut c = d.client().await.unwrap();
        if round == 0 {
            // Pinned through gemmactl, shared (this test's uid is the daemon's: an admin)
            // and written to disk.
            let out = d
                .gemmactl()
                .unwrap()
                .args([
                    "cache-prompt",
                    "--shared",
                    "--persist",
                    "--json",
                    "--system",
                ])
                .arg(&system)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["shared"], true, "{v}");
            assert_eq!(v["key"].as_str().unwrap().len(), 16, "{v}");
            // Wait for the file (written in the background).
            let t0 = std::time::Instant::now();
            loop {
                let p = c.status().await.unwrap().prompt_cache.unwrap();
                if p.pinned.iter().any(|x| x.on_disk) {
                    break;
                }
                assert!(t0.elapsed() < gemmad_e2e::HANG, "never written: {p:?}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        let p = c.status().await.unwrap().prompt_cache.unwrap();
        assert_eq!(p.pinned.len(), 1, "round {round}: {p:?}");
        let pinned = p.pinned[0].clone();
        assert!(pinned.shared && pinned.on_disk, "{pinned:?}");
        let g = &chat(&mut c, Some(&system), &["which colour is the sky?"]).await[0];
        let u = usage(g);
        assert!(
            u.cached_tokens + 8 >= pinned.tokens && u.cached_tokens <= pinned.tokens,
            "round {round}: cached {} of a pinned {}",
            u.cached_tokens,
            pinned.tokens
        );
        match &first {
            None => first = Some(g.token_ids.clone()),
            Some(t) => assert_eq!(&g.token_ids, t, "same answer after the restart"),
        }
        if round == 1 {
            let status = d.gemmactl().unwrap().arg("status").output().unwrap();
            let text = String::from_utf8_lossy(&status.stdout);
            assert!(
                text.contains(&format!("pinned {}", pinned.key)) && text.contains("shared"),
                "{text}"
            );
            let drop_it = || {
                d.gemmactl()
                    .unwrap()
                    .args(["drop-cached-prompt", &pinned.key])
                    .output()
                    .unwrap()
            };
            let out = drop_it();
            assert!(out.status.success(), "{out:?}");
            let p = c.status().await.unwrap().prompt_cache.unwrap();
            assert!(p.pinned.is_empty() && p.disk_entries == 0, "{p:?}");
            // A key that is not there, and one that is not a key.
            let out = drop_it();
            assert!(!out.status.success());
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("no cached prompt"),
                "{out:?}"
            );
            let e = c.drop_cached_prompt("../etc").await.unwrap_err();
            assert!(e.to_string().contains("16 hex digits"), "{e}");
            // Both messages and ids: refused, and the daemon goes on.
            let e = c
                .cache_prompt(pb::CachePromptRequest {
                    messages: vec![message("system", vec![text_part("x")])],
                    ids: vec![2, 3],
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert!(e.to_string().contains("either messages or ids"), "{e}");
            c.status().await.unwrap();
        }
    }
}
