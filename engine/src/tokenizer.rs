//! The checkpoint's tokenizer (`tokenizer.json` via the `tokenizers` crate) and chat
//! template (from `tokenizer_config.json` or `chat_template.jinja`, rendered with
//! minijinja the way transformers renders it: trim_blocks, lstrip_blocks, loop controls).

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde_json::Value;

use crate::error::{EngineError, Result};

/// A Gemma tokenizer plus its chat template and special-token strings.
pub struct TextTokenizer {
    path: PathBuf,
    tok: tokenizers::Tokenizer,
    template: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
    pad_token: String,
    unk_token: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("vocab", &self.tok.get_vocab_size(true))
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

fn token_string(v: Option<&Value>, default: &str) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string(),
        _ => default.to_string(),
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja` (which wins, as in transformers 5).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::Tokenizer {
                path,
                reason:
                    "file not found (the checkpoint folder needs tokenizer.json for text prompts)"
                        .into(),
            });
        }
        let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg_text = match std::fs::read(&cfg_path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(EngineError::io(&cfg_path, e)),
        };
        let jinja_path = dir.join("chat_template.jinja");
        let jinja = match std::fs::read_to_string(&jinja_path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(EngineError::io(&jinja_path, e)),
        };
        let cfg = cfg_text.as_deref().map(|t| (cfg_path.as_path(), t));
        Self::from_parts(path, tok, cfg, jinja)
    }

    /// A tokenizer from its already-read parts: the loaded `tokenizer.json` (`path`, for
    /// error messages), the bytes of `tokenizer_config.json` and the text of
    /// `chat_template.jinja` when they exist (the latter wins over the config's template).
    pub fn from_parts(
        path: PathBuf,
        mut tok: tokenizers::Tokenizer,
        config: Option<(&Path, &[u8])>,
        chat_template_jinja: Option<String>,
    ) -> Result<Self> {
        let cfg: Value = match config {
            Some((cfg_path, t)) => {
                serde_json::from_slice(t).map_err(|e| EngineError::Tokenizer {
                    path: cfg_path.to_path_buf(),
                    reason: format!("not valid JSON: {e}"),
                })?
            }
            None => Value::Null,
        };
        let template_src = match chat_template_jinja {
            Some(t) => Some(t),
            None => match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_string),
                _ => None,
            },
        };
        let template = match template_src {
            Some(src) => Some(build_env(src)?),
            None => None,
        };
        // The BPE model caches every text piece under 256 bytes it has seen, 10,000 per
        // thread and never evicted: a daemon that tokenizes strangers' text would keep
        // ~8 KB per distinct piece (tens of MB per thread) for good. Prompts rarely
        // repeat piece for piece, so the cache buys little here.
        let mut model = tok.get_model().clone();
        model.resize_cache(0);
        tok.with_model(model);
        Ok(TextTokenizer {
            path,
            tok,
            template,
            bos_token: token_string(cfg.get("bos_token"), "<bos>"),
            eos_token: token_string(cfg.get("eos_token"), "<eos>"),
            pad_token: token_string(cfg.get("pad_token"), "<pad>"),
            unk_token: token_string(cfg.get("unk_token"), "<unk>"),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Token ids of `text`. With `add_special`, the post-processor adds `<bos>`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.tok
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenizer {
                path: self.path.clone(),
                reason: format!("encode failed: {e}"),
            })
    }

    /// Text of `ids`; special tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tok
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer {
                path: self.path.clone(),
                reason: format!("decode failed: {e}"),
            })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tok
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders `messages` (transformers' message dicts as JSON) with the chat template.
    pub fn render_chat(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let env = self.template.as_ref().ok_or_else(|| {
            EngineError::Template(
                "the checkpoint has no chat template (tokenizer_config.json / chat_template.jinja)"
                    .into(),
            )
        })?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            pad_token => &self.pad_token,
            unk_token => &self.unk_token,
        };
        tmpl.render(ctx).map_err(|e| {
            // Surface raise_exception's message itself: it is written for people.
            let mut msg = e.to_string();
            if e.kind() == ErrorKind::InvalidOperation {
                if let Some(d) = e.detail() {
                    msg = d.to_string();
                }
            }
            EngineError::Template(msg)
        })
    }
}

fn build_env(src: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template_owned("chat", src)
        .map_err(|e| EngineError::Template(format!("chat template does not parse: {e}")))?;
    Ok(env)
}
