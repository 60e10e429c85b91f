//! Tokenizer and chat template against transformers' renderings (fixtures), and the real
//! Gemma 3 tokenizer's round trip over many scripts.

mod common;

use common::fixture;
use gemmad_engine::TextTokenizer;
use serde_json::Value;

fn chat_cases() -> Vec<Value> {
    let t = std::fs::read_to_string(fixture("text").join("chat_goldens.json")).unwrap();
    serde_json::from_str::<Vec<Value>>(&t).unwrap()
}

fn check_renderings(dir: &str) {
    let tok = TextTokenizer::from_dir(&fixture(dir)).unwrap();
    assert!(tok.has_chat_template());
    let cases = chat_cases();
    assert!(cases.len() >= 5);
    for (i, c) in cases.iter().enumerate() {
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let got = tok.render_chat(&c["messages"], gen).unwrap();
        assert_eq!(got, c["rendered"].as_str().unwrap(), "{dir} case {i}");
        let ids: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(&got, false).unwrap(), ids, "{dir} case {i} ids");
    }
}

#[test]
fn chat_template_from_tokenizer_config_matches_transformers() {
    check_renderings("text");
}

#[test]
fn chat_template_from_jinja_file_matches_transformers() {
    assert!(fixture("full").join("chat_template.jinja").exists());
    check_renderings("full");
}

#[test]
fn template_errors_are_reported_not_panicked() {
    let tok = TextTokenizer::from_dir(&fixture("text")).unwrap();
    let msgs = serde_json::json!([
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"}
    ]);
    let e = tok.render_chat(&msgs, true).unwrap_err().to_string();
    assert!(e.contains("alternate"), "{e}");
}

#[test]
fn encode_decode_matches_transformers_goldens() {
    let t = std::fs::read_to_string(fixture("text").join("tokenizer_goldens.json")).unwrap();
    let g: Value = serde_json::from_str(&t).unwrap();
    let tok = TextTokenizer::from_dir(&fixture("text")).unwrap();
    assert_eq!(tok.vocab_size(), g["vocab_size"].as_u64().unwrap() as usize);
    for (name, id) in g["special_ids"].as_object().unwrap() {
        assert_eq!(
            tok.token_to_id(name),
            Some(id.as_u64().unwrap() as u32),
            "{name}"
        );
    }
    for c in g["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        let with: Vec<u32> = serde_json::from_value(c["ids_with_special"].clone()).unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids, "{text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), with, "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

/// The real Gemma 3 tokenizer (262144 entries), fetched by `.ci/fetch-test-data` into
/// `target/test-data/gemma3/`. CI sets GEMMAD_REQUIRE_TEST_DATA=1 so a missing file fails.
#[test]
fn real_gemma3_tokenizer_round_trips_ten_scripts() {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-data/gemma3");
    if !dir.join("tokenizer.json").exists() {
        if std::env::var("GEMMAD_REQUIRE_TEST_DATA").as_deref() == Ok("1") {
            panic!("{} missing: run .ci/fetch-test-data", dir.display());
        }
        eprintln!("skipping: run .ci/fetch-test-data to fetch the real Gemma 3 tokenizer");
        return;
    }
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.inner().get_vocab_size(false), 262144);
    assert_eq!(tok.token_to_id("<start_of_turn>"), Some(105));
    assert_eq!(tok.token_to_id("<end_of_turn>"), Some(106));
    assert_eq!(tok.token_to_id("<bos>"), Some(2));
    let samples = [
        (
            "Latin",
            "The quick brown fox jumps over the lazy dog. Ça va? Zażółć gęślą jaźń.",
        ),
        (
            "Cyrillic",
            "Съешь же ещё этих мягких французских булок, да выпей чаю.",
        ),
        ("Greek", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία."),
        (
            "Arabic",
            "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر",
        ),
        ("Hebrew", "דג סקרן שט בים מאוכזב ולפתע מצא חברה"),
        (
            "Devanagari",
            "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले",
        ),
        ("Thai", "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน"),
        ("CJK", "我能吞下玻璃而不伤身体。私はガラスを食べられます。"),
        ("Hangul", "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요"),
        ("Emoji", "Gemma on a laptop 💻🔋🔥 — 👩🏽‍💻 ok? 🇩🇪"),
        ("Mixed whitespace", "  tabs\tand\nnew\n\nlines  "),
    ];
    for (script, text) in samples {
        let ids = tok.encode(text, false).unwrap();
        assert!(!ids.is_empty(), "{script}");
        assert!(!ids.contains(&3), "{script}: <unk> in {ids:?}");
        let back = tok.decode(&ids, false).unwrap();
        assert_eq!(back, text, "{script} round trip");
        // With special tokens: exactly one leading <bos>.
        let with = tok.encode(text, true).unwrap();
        assert_eq!(with[0], 2, "{script}");
        assert_eq!(&with[1..], &ids[..], "{script}");
    }
}
