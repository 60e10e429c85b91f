//! Streaming detokenization: generated ids become text deltas, with multi-byte
//! characters and possible stop strings held back until they are settled.

use std::sync::Arc;

use crate::error::Result;
use crate::tokenizer::TextTokenizer;

/// Turns generated ids into text deltas: decodes a short window of recent ids (so that
/// SentencePiece spaces and multi-token characters come out right), holds back incomplete
/// UTF-8 and any tail that could still grow into a stop string.
pub(crate) struct TextStream {
    tok: Option<Arc<TextTokenizer>>,
    stop: Vec<String>,
    ids: Vec<u32>,
    prefix_start: usize,
    read_start: usize,
    /// All text decoded so far (append-only), and how much of it has been released.
    text: String,
    released: usize,
}

impl TextStream {
    pub(crate) fn new(tok: Option<Arc<TextTokenizer>>, stop: Vec<String>) -> Self {
        TextStream {
            tok,
            stop,
            ids: Vec::new(),
            prefix_start: 0,
            read_start: 0,
            text: String::new(),
            released: 0,
        }
    }

    /// Adds a token; returns the releasable text and whether a stop string was found.
    pub(crate) fn push(&mut self, id: u32) -> Result<(String, bool)> {
        let Some(tok) = self.tok.as_deref() else {
            return Ok((String::new(), false));
        };
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_start..self.read_start], true)?;
        let full = tok.decode(&self.ids[self.prefix_start..], true)?;
        if full.ends_with('\u{FFFD}') || full.len() <= prefix.len() {
            return Ok((String::new(), false)); // incomplete character, or nothing visible yet
        }
        // Byte-fallback garbage can change how the window's start decodes; never re-emit.
        let cut = if full.starts_with(&prefix) {
            prefix.len()
        } else {
            floor_char_boundary(&full, prefix.len())
        };
        self.text.push_str(&full[cut..]);
        self.prefix_start = self.read_start;
        self.read_start = self.ids.len();

        let search_from = floor_char_boundary(
            &self.text,
            self.released.saturating_sub(self.max_stop_len()),
        );
        let hay = &self.text[search_from..];
        if let Some(at) = self.stop.iter().filter_map(|s| hay.find(s.as_str())).min() {
            let end = (search_from + at).max(self.released);
            let delta = self.text[self.released..end].to_string();
            self.released = end;
            return Ok((delta, true));
        }
        // Hold back the longest suffix that is a prefix of a stop string.
        let mut hold = 0;
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if k <= self.text.len()
                    && s.is_char_boundary(k)
                    && self.text.is_char_boundary(self.text.len() - k)
                    && self.text.ends_with(&s[..k])
                {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        let end = (self.text.len() - hold).max(self.released);
        let delta = self.text[self.released..end].to_string();
        self.released = end;
        Ok((delta, false))
    }

    fn max_stop_len(&self) -> usize {
        self.stop.iter().map(String::len).max().unwrap_or(0)
    }

    /// What is still held back, at the end of generation.
    pub(crate) fn flush(&mut self) -> Result<String> {
        if self.released >= self.text.len() {
            return Ok(String::new());
        }
        let rest = self.text[self.released..].to_string();
        self.released = self.text.len();
        Ok(rest)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
