//! A Generate call's request bytes: decoded as `gemmad.v1.GenerateRequest` (prost, as
//! tonic decodes it), converted at the gRPC edge, then checked and prepared by the core
//! with the fixture's tokenizer and chat template under the default limits.
#![no_main]

use std::sync::OnceLock;

use gemmad::config::LimitsSection;
use gemmad::core::validate;
use gemmad::grpc::convert;
use gemmad_engine::internals::parse;
use gemmad_engine::Prompter;
use gemmad_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

static TOKENIZER_JSON: &[u8] = include_bytes!("../../engine/tests/fixtures/text/tokenizer.json");
static TOKENIZER_CONFIG: &[u8] =
    include_bytes!("../../engine/tests/fixtures/text/tokenizer_config.json");

fn prompter() -> &'static Prompter {
    static P: OnceLock<Prompter> = OnceLock::new();
    P.get_or_init(|| {
        let tok = tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON).expect("fixture tokenizer");
        let tok = parse::tokenizer(tok, Some(TOKENIZER_CONFIG), None).expect("fixture config");
        let vocab = tok.vocab_size();
        parse::prompter(tok, vocab, 32768)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::GenerateRequest::decode(data) else {
        return;
    };
    let Ok(params) = convert::generate(req) else {
        return;
    };
    let limits = LimitsSection::default();
    if let Ok(p) = validate::prepare(params, prompter(), &limits, &["full".to_string()]) {
        assert!(p.request.max_tokens >= 1 && p.request.max_tokens <= limits.max_tokens);
    }
});
