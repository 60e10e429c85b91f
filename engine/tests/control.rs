//! The engine's control surface on the committed fixtures: generation step by step,
//! typed control commands and when they may be applied, the towers' state, and the
//! prompt pipeline refusing what it cannot run without paging anything in.

mod common;

use std::path::Path;

use common::fixture;
use gemmad_engine::*;

fn load(dir: &Path, cache_dir: Option<&Path>) -> Engine {
    Engine::load(
        dir,
        LoadOptions {
            threads: Some(1),
            max_context: Some(256),
            cache_dir: cache_dir.map(Path::to_path_buf),
            ..Default::default()
        },
    )
    .unwrap()
}

fn seeded(prompt: &str, max_tokens: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::Chat(vec![ChatMessage::text("user", prompt)]));
    r.sampling.seed = Some(7);
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    r
}

fn tower(e: &Engine, m: Modality) -> TowerState {
    e.state()
        .towers
        .into_iter()
        .find(|t| t.modality == m)
        .unwrap()
}

/// Runs `g` to its end, collecting what it streamed.
fn drain(e: &mut Engine, g: &mut Generation) -> (Vec<u32>, String, GenerateOutput) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        match e.step(g).unwrap() {
            Step::Token { id, text: t } => {
                ids.push(id);
                text.push_str(&t);
            }
            Step::Done { output, tail } => {
                text.push_str(&tail);
                return (ids, text, output);
            }
        }
    }
}

#[test]
fn steps_give_what_generate_gives() {
    let mut e = load(&fixture("text"), None);
    let req = seeded("hello there", 12);
    let whole = e
        .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    let mut g = e.start(&req).unwrap();
    let (ids, text, out) = drain(&mut e, &mut g);
    assert_eq!(ids, whole.token_ids);
    assert_eq!(out.token_ids, whole.token_ids);
    assert_eq!(text, whole.text);
    assert_eq!(out.text, whole.text);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.usage.prompt_tokens, whole.usage.prompt_tokens);
    assert_eq!(out.usage.completion_tokens, whole.usage.completion_tokens);
    // The same prompt again resumes all but its last token from the prompt cache.
    assert_eq!(whole.usage.cached_tokens, 0);
    assert_eq!(out.usage.cached_tokens, whole.usage.prompt_tokens - 1);
    // A finished generation takes no more steps.
    assert!(e.step(&mut g).is_err());
}

#[test]
fn a_cancelled_generation_ends_at_its_next_step() {
    let mut e = load(&fixture("text"), None);
    let mut g = e.start(&seeded("hello", 50)).unwrap();
    assert!(matches!(e.step(&mut g).unwrap(), Step::Token { .. }));
    g.cancel();
    match e.step(&mut g).unwrap() {
        Step::Done { output, tail } => {
            assert_eq!(output.finish_reason, FinishReason::Cancelled);
            assert_eq!(output.usage.completion_tokens, 1);
            assert!(tail.is_empty());
        }
        other => panic!("expected the end, got {other:?}"),
    }
    assert!(!e.state().generating);
}

#[test]
fn a_new_generation_ends_the_old_one() {
    let mut e = load(&fixture("text"), None);
    let mut old = e.start(&seeded("one", 10)).unwrap();
    e.step(&mut old).unwrap();
    let mut new = e.start(&seeded("two", 3)).unwrap();
    let err = e.step(&mut old).unwrap_err();
    assert!(err.to_string().contains("ended by another"), "{err}");
    let (ids, _, _) = drain(&mut e, &mut new);
    assert_eq!(ids.len(), 3);
}

#[test]
fn commands_that_reshape_the_engine_wait_for_the_request_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let mut e = load(&fixture("text"), Some(tmp.path()));
    let req = seeded("hello there", 6);
    let reference = e
        .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap();

    let mut g = e.start(&req).unwrap();
    assert!(e.state().generating);
    let mut ids = Vec::new();
    if let Step::Token { id, .. } = e.step(&mut g).unwrap() {
        ids.push(id);
    }
    for c in [Control::LimitContext(128), Control::LimitThreads(2)] {
        assert!(!c.safe_mid_request());
        let err = e.control(&c).unwrap_err();
        assert!(err.to_string().contains("between requests"), "{err}");
    }
    // Page release and the hot-row budget are safe between two decode steps, and do not
    // change what is generated.
    for c in [Control::ReleasePlePages, Control::SetPleHotBytes(4096)] {
        assert!(c.safe_mid_request());
        e.control(&c).unwrap();
    }
    assert_eq!(e.state().ple_hot_bytes, Some(4096));
    let (rest, _, out) = drain(&mut e, &mut g);
    ids.extend(rest);
    assert_eq!(ids, reference.token_ids);
    assert_eq!(out.token_ids, reference.token_ids);

    // Between requests they apply, and Status-facing state follows at once.
    e.control(&Control::LimitContext(32)).unwrap();
    e.control(&Control::LimitThreads(2)).unwrap();
    let st = e.state();
    assert_eq!((st.max_context, st.threads), (32, 2));
    assert_eq!(e.max_context(), 32);
    let long = "word ".repeat(40);
    let p = e.prompter();
    assert_eq!(p.max_context(), 32);
    let err = p
        .prepare(&Prompt::Chat(vec![ChatMessage::text("user", &long)]))
        .unwrap_err();
    assert!(
        matches!(err, EngineError::ContextFull { max: 32, .. }),
        "{err}"
    );
    let out = e.generate(&seeded("hi", 4), &mut |_| {
        std::ops::ControlFlow::Continue(())
    });
    assert_eq!(out.unwrap().usage.completion_tokens, 4);

    for bad in [
        Control::LimitContext(0),
        Control::LimitContext(1 << 30),
        Control::LimitThreads(0),
    ] {
        assert!(e.control(&bad).is_err(), "{bad:?}");
    }
    assert_eq!(e.state().max_context, 32);
}

#[test]
fn the_hot_row_budget_needs_the_ple_cache() {
    let mut e = load(&fixture("text"), None);
    assert_eq!(e.state().ple_hot_bytes, None);
    let err = e.control(&Control::SetPleHotBytes(1 << 20)).unwrap_err();
    assert!(err.to_string().contains("PLE cache"), "{err}");
    // Releasing pages that are not there is harmless.
    e.control(&Control::ReleasePlePages).unwrap();
}

#[test]
fn towers_load_and_unload_through_control_and_report_their_bytes() {
    let mut e = load(&fixture("full"), None);
    for m in Modality::ALL {
        let t = tower(&e, m);
        assert!(t.available && !t.loaded, "{t:?}");
        assert_eq!(t.bytes, 0, "{m}: an unloaded tower holds no bytes");
    }
    e.control(&Control::LoadTower(Modality::Vision)).unwrap();
    let v = tower(&e, Modality::Vision);
    assert!(v.loaded && v.bytes > 0, "{v:?}");
    assert!(!tower(&e, Modality::Audio).loaded);
    let rep = e.memory_report();
    assert!(rep.part(Part::Tower(Modality::Vision)).unwrap().active);
    assert!(!rep.part(Part::Tower(Modality::Audio)).unwrap().active);

    // Unloading is safe between two decode steps.
    let mut g = e.start(&seeded("look", 4)).unwrap();
    e.step(&mut g).unwrap();
    e.control(&Control::UnloadTower(Modality::Vision)).unwrap();
    let v = tower(&e, Modality::Vision);
    assert!(!v.loaded && v.bytes == 0, "{v:?}");
    drain(&mut e, &mut g);

    // A tower the checkpoint lacks: a clear error, nothing changes.
    let mut text = load(&fixture("text"), None);
    let t = tower(&text, Modality::Audio);
    assert!(!t.available && !t.loaded);
    let err = text
        .control(&Control::LoadTower(Modality::Audio))
        .unwrap_err();
    assert!(matches!(err, EngineError::ModalityUnavailable(_)), "{err}");
}

#[test]
fn media_is_refused_before_any_tower_is_paged_in() {
    let mut e = load(&fixture("full"), None);
    let req = GenerateRequest::new(Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: vec![
            ContentPart::Image(b"\x89PNG\r\n\x1a\n0000".to_vec()),
            ContentPart::Text("what is it?".into()),
        ],
    }]));
    let err = e.prompter().prepare(&req.prompt).unwrap_err();
    assert!(matches!(err, EngineError::ModalityUnavailable(_)), "{err}");
    let err = e
        .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap_err();
    assert!(err.to_string().contains("not available"), "{err}");
    let v = tower(&e, Modality::Vision);
    assert!(!v.loaded && v.bytes == 0, "{v:?}");
}

#[test]
fn the_prompter_prepares_what_the_engine_runs() {
    let mut e = load(&fixture("text"), None);
    let p = e.prompter();
    let chat = Prompt::Chat(vec![ChatMessage::text("user", "hello there")]);
    let prepared = p.prepare(&chat).unwrap();
    assert_eq!(prepared.ids(), e.prompt_ids(&chat).unwrap());
    let mut a = seeded("hello there", 5);
    let mut b = a.clone();
    b.prompt = Prompt::Prepared(prepared);
    a.ignore_eos = true;
    let go = |e: &mut Engine, r: &GenerateRequest| {
        e.generate(r, &mut |_| std::ops::ControlFlow::Continue(()))
            .unwrap()
            .token_ids
    };
    assert_eq!(go(&mut e, &a), go(&mut e, &b));
    // Ids outside the vocabulary and empty prompts are refused with the reason.
    let err = p.prepare(&Prompt::Ids(vec![2, 999_999])).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    assert!(p.prepare(&Prompt::Ids(vec![])).is_err());
}
