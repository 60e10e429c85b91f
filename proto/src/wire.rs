//! Counts of a request read from its wire bytes, before prost decodes it. A protobuf
//! element of a few bytes (an empty text part is 4) decodes to a struct of tens of bytes
//! and, further on, to a template value of hundreds: a few megabytes of them became
//! gigabytes. Counting first lets the server refuse such a request at the cost of one
//! pass over its bytes, with no allocation.

/// What a Generate or Tokenize request holds, counted on the wire. A field repeated
/// where proto3 keeps the last (a part's `oneof`, a second `conversation`) is counted
/// each time, since prost decodes each before it keeps one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub messages: usize,
    /// Parts of all messages.
    pub parts: usize,
    /// The message with the most parts: (its index, its parts).
    pub largest_message: (usize, usize),
    /// Image and audio parts.
    pub media: usize,
    pub stop_strings: usize,
}

impl RequestCounts {
    fn message(&mut self, msg: &[u8]) -> Option<()> {
        let index = self.messages;
        self.messages += 1;
        let mut parts = 0;
        fields(msg, |no, payload| {
            if no == 2 {
                parts += 1;
                // Part { text = 1, image = 2, audio = 3 }
                fields(payload?, |kind, _| {
                    if kind == 2 || kind == 3 {
                        self.media += 1;
                    }
                    Some(())
                })
            } else {
                Some(())
            }
        })?;
        self.parts += parts;
        if parts > self.largest_message.1 {
            self.largest_message = (index, parts);
        }
        Some(())
    }

    /// The counts of an encoded `GenerateRequest`; `None` when the bytes are not
    /// well-formed protobuf (prost then says why).
    pub fn generate(buf: &[u8]) -> Option<RequestCounts> {
        let mut c = RequestCounts::default();
        fields(buf, |no, payload| match no {
            1 => c.message(payload?),
            4 => {
                c.stop_strings += 1;
                Some(())
            }
            _ => Some(()),
        })?;
        Some(c)
    }

    /// The counts of an encoded `TokenizeRequest` (its conversation's messages).
    pub fn tokenize(buf: &[u8]) -> Option<RequestCounts> {
        let mut c = RequestCounts::default();
        fields(buf, |no, payload| match no {
            2 => fields(payload?, |m, msg| match m {
                1 => c.message(msg?),
                _ => Some(()),
            }),
            _ => Some(()),
        })?;
        Some(c)
    }
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Calls `f(field number, payload)` for each field of one message level; the payload is
/// `Some` for length-delimited fields. Stops at the first `None` from `f` or at bytes
/// that are not protobuf.
fn fields(mut buf: &[u8], mut f: impl FnMut(u64, Option<&[u8]>) -> Option<()>) -> Option<()> {
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let payload = match key & 7 {
            0 => {
                varint(&mut buf)?;
                None
            }
            1 => {
                buf = buf.get(8..)?;
                None
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                let (p, rest) = (buf.get(..len)?, buf.get(len..)?);
                buf = rest;
                Some(p)
            }
            5 => {
                buf = buf.get(4..)?;
                None
            }
            // Groups (3, 4) are not in gemmad.proto; anything else is malformed.
            _ => return None,
        };
        f(key >> 3, payload)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;
    use prost::Message;

    fn text(t: &str) -> pb::Part {
        pb::Part {
            kind: Some(pb::part::Kind::Text(t.into())),
        }
    }

    fn image() -> pb::Part {
        pb::Part {
            kind: Some(pb::part::Kind::Image(pb::Image {
                data: vec![1, 2],
                mime_type: String::new(),
            })),
        }
    }

    fn messages() -> Vec<pb::Message> {
        vec![
            pb::Message {
                role: "system".into(),
                parts: vec![text("")],
            },
            pb::Message {
                role: "user".into(),
                parts: vec![text("a"), image(), text(""), image()],
            },
            pb::Message::default(),
        ]
    }

    #[test]
    fn counts_what_prost_decodes() {
        let r = pb::GenerateRequest {
            messages: messages(),
            stop: vec![String::new(), "x".into()],
            max_tokens: 300,
            sampling: Some(pb::Sampling {
                temperature: Some(0.5),
                seed: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        let want = RequestCounts {
            messages: 3,
            parts: 5,
            largest_message: (1, 4),
            media: 2,
            stop_strings: 2,
        };
        assert_eq!(RequestCounts::generate(&r.encode_to_vec()), Some(want));
        let t = pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Conversation(
                pb::Conversation {
                    messages: messages(),
                },
            )),
            add_special_tokens: true,
        };
        let want = RequestCounts {
            stop_strings: 0,
            ..want
        };
        assert_eq!(RequestCounts::tokenize(&t.encode_to_vec()), Some(want));
        // A second `conversation` is merged by prost: its messages count too.
        let mut twice = t.encode_to_vec();
        twice.extend(t.encode_to_vec());
        assert_eq!(RequestCounts::tokenize(&twice).map(|c| c.messages), Some(6));
    }

    #[test]
    fn malformed_bytes_are_left_to_prost() {
        let r = pb::GenerateRequest {
            messages: messages(),
            ..Default::default()
        }
        .encode_to_vec();
        for cut in 1..r.len() {
            let c = RequestCounts::generate(&r[..cut]);
            assert_eq!(
                c.is_some(),
                pb::GenerateRequest::decode(&r[..cut]).is_ok(),
                "{cut}"
            );
        }
        assert_eq!(RequestCounts::generate(&[0x0b]), None);
        assert_eq!(RequestCounts::generate(&[0xFF; 11]), None);
    }
}
