//! Requests that cost the daemon far more than they cost the sender: a few megabytes of
//! tiny elements (empty parts, messages, stop strings, media) or of text that tokenizes
//! to a token a byte. Each is refused with a clear error, and the daemon's peak memory
//! (VmHWM, reset before the request) and CPU time stay within a small multiple of the
//! request's size: the bounds catch amplification (they once were gigabytes and
//! seconds), not a few percent.

use std::time::Duration;

use gemmad_client::{message, pb, text_part, user_prompt};
use gemmad_e2e::Daemon;
use prost::Message;
use tonic::Code;

fn start() -> Daemon {
    Daemon::start("[model]\nthreads = 1\n").expect("starting gemmad")
}

/// Sends `call` to a fresh daemon and checks the refusal and what it cost: the error's
/// code and a part of its message, peak memory growth under 4 x `request_bytes` + 32
/// MiB, and under 2 s of the daemon's CPU.
async fn refused<F, Fut>(request_bytes: usize, code: Code, says: &str, call: F)
where
    F: FnOnce(gemmad_client::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let d = start();
    let c = d.client().await.unwrap();
    // Let start-up's work settle, then measure from here.
    c.clone().status().await.unwrap();
    d.reset_hwm().unwrap();
    let (rss0, cpu0) = (d.rss().unwrap(), d.cpu_time().unwrap());
    let err = tokio::time::timeout(gemmad_e2e::HANG, call(c))
        .await
        .expect("no answer")
        .expect_err("the request was not refused");
    let (hwm, cpu) = (d.hwm().unwrap(), d.cpu_time().unwrap() - cpu0);
    let grew = hwm.saturating_sub(rss0);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "{} MiB request: peak +{:.1} MiB, cpu {cpu:?}: {:?} {}",
        mib(request_bytes as u64),
        mib(grew),
        err.code(),
        err.message()
    );
    assert_eq!(err.code(), code, "{err:?}");
    assert!(
        err.message().contains(says),
        "{:?} lacks {says:?}",
        err.message()
    );
    let bound = 4 * request_bytes as u64 + (32 << 20);
    assert!(
        grew < bound,
        "a {request_bytes}-byte request raised the daemon's peak RSS by {grew} bytes (bound {bound})"
    );
    assert!(
        cpu < Duration::from_secs(2),
        "the daemon spent {cpu:?} of CPU"
    );
}

async fn generate(
    mut c: gemmad_client::Client,
    r: pb::GenerateRequest,
) -> Result<(), tonic::Status> {
    let mut s = c.raw().generate(r).await?.into_inner();
    while s.message().await?.is_some() {}
    Ok(())
}

async fn tokenize(
    mut c: gemmad_client::Client,
    r: pb::TokenizeRequest,
) -> Result<(), tonic::Status> {
    c.raw().tokenize(r).await.map(|_| ())
}

fn request(messages: Vec<pb::Message>) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_million_empty_text_parts() {
    let r = request(vec![message("user", vec![text_part(""); 1 << 20])]);
    let n = r.encoded_len();
    refused(
        n,
        Code::InvalidArgument,
        "limits.max_parts_per_message",
        |c| generate(c, r),
    )
    .await;
}

#[tokio::test]
async fn a_million_empty_parts_in_a_tokenize_conversation() {
    let r = pb::TokenizeRequest {
        input: Some(pb::tokenize_request::Input::Conversation(
            pb::Conversation {
                messages: vec![message("user", vec![text_part(""); 1 << 20])],
            },
        )),
        add_special_tokens: false,
    };
    let n = r.encoded_len();
    refused(
        n,
        Code::InvalidArgument,
        "limits.max_parts_per_message",
        |c| tokenize(c, r),
    )
    .await;
}

#[tokio::test]
async fn a_million_messages() {
    let r = request(vec![message("user", vec![text_part("")]); 1 << 20]);
    let n = r.encoded_len();
    refused(n, Code::InvalidArgument, "limits.max_messages", |c| {
        generate(c, r)
    })
    .await;
}

#[tokio::test]
async fn four_million_empty_stop_strings() {
    let mut r = user_prompt("hi");
    r.stop = vec![String::new(); 4 << 20];
    let n = r.encoded_len();
    refused(n, Code::InvalidArgument, "limits.max_stop_strings", |c| {
        generate(c, r)
    })
    .await;
}

#[tokio::test]
async fn half_a_million_tiny_images() {
    let png = gemmad_client::image_part(b"\x89PNG\r\n\x1a\n".to_vec());
    let r = request(vec![message("user", vec![png.clone(); 1 << 19])]);
    let n = r.encoded_len();
    refused(n, Code::InvalidArgument, "limits.max_parts", |c| {
        generate(c, r)
    })
    .await;
    // Few enough parts, too many images: the media limit itself.
    let r = request(vec![message("user", vec![png; 17])]);
    refused(
        r.encoded_len(),
        Code::InvalidArgument,
        "limits.max_media_parts",
        |c| generate(c, r),
    )
    .await;
}

/// A megabyte of text that the fixture's tokenizer turns into about a token a byte: a
/// prompt far over the context, which must be refused without tokenizing all of it.
fn token_a_byte() -> String {
    let chars: String = ('!'..='~').collect();
    chars.repeat((1 << 20) / chars.len())
}

#[tokio::test]
async fn a_megabyte_prompt_of_one_byte_tokens() {
    let r = user_prompt(&token_a_byte());
    let n = r.encoded_len();
    refused(n, Code::InvalidArgument, "context full", |c| generate(c, r)).await;
}

#[tokio::test]
async fn a_megabyte_tokenize_text_of_one_byte_tokens() {
    let r = pb::TokenizeRequest {
        input: Some(pb::tokenize_request::Input::Text(token_a_byte())),
        add_special_tokens: false,
    };
    let n = r.encoded_len();
    refused(n, Code::InvalidArgument, "too long", |c| tokenize(c, r)).await;
}

/// `n` distinct 200-byte words of letters, each followed by `<eos>`: the tokenizer splits
/// text at special tokens and caches each piece under 256 bytes (Gemma's and the
/// fixture's normalizer turn spaces into `▁` first, so spaces do not split).
fn unique_words(from: usize, n: usize) -> String {
    let mut s = String::with_capacity(n * 201);
    for i in from..from + n {
        let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push((b'a' + (x % 26) as u8) as char);
        }
        s.push_str("<eos>");
    }
    s
}

/// Text that tokenizes fine, but whose every word is new: the tokenizer's word cache
/// (10,000 entries of ~7 KB each for such words, per thread) once kept ~70 MB per
/// thread for good after a few megabytes of it.
#[tokio::test]
async fn distinct_words_are_not_kept_after_the_request() {
    let d = start();
    let mut c = d.client().await.unwrap();
    c.status().await.unwrap();
    let rss0 = d.rss().unwrap();
    let per = 400;
    for k in 0..40 {
        let r = pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Text(unique_words(
                k * per,
                per,
            ))),
            add_special_tokens: false,
        };
        c.raw().tokenize(r).await.expect("tokenize");
    }
    let grew = d.rss().unwrap().saturating_sub(rss0);
    eprintln!(
        "16000 distinct words: RSS +{:.1} MiB",
        grew as f64 / (1 << 20) as f64
    );
    assert!(
        grew < 24 << 20,
        "3.2 MB of distinct words left the daemon {grew} bytes larger"
    );
}
