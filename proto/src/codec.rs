//! The prost codec with two changes: a request that fails to decode (bad wire format,
//! text that is not UTF-8) is INVALID_ARGUMENT, not INTERNAL, because it is the
//! caller's input that is wrong and the caller who can fix it; and Generate and Tokenize
//! requests are counted on the wire ([`crate::wire`]) and put to the server's
//! [`RequestCheck`] before prost decodes them, so a request of too many tiny elements
//! is refused before it costs memory.

use std::any::TypeId;
use std::sync::{Arc, RwLock};

use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::prost::bytes::Buf;
use tonic_prost::prost::Message;
use tonic_prost::ProstCodec;

use crate::v1;
use crate::wire::RequestCounts;

/// The server's limits on a request's counts: `Err(why)` refuses it (INVALID_ARGUMENT).
pub type RequestCheck = dyn Fn(&RequestCounts) -> Result<(), String> + Send + Sync;

static CHECK: RwLock<Option<Arc<RequestCheck>>> = RwLock::new(None);

/// Installs the check every decoded Generate and Tokenize request passes first (a
/// server sets it once; the codec is built by generated code, so it cannot be handed
/// one). Without one, requests are decoded unchecked.
pub fn set_request_check(check: Arc<RequestCheck>) {
    match CHECK.write() {
        Ok(mut c) => *c = Some(check),
        Err(p) => *p.into_inner() = Some(check),
    }
}

fn request_check() -> Option<Arc<RequestCheck>> {
    match CHECK.read() {
        Ok(c) => c.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// Counts `buf` when it holds a request type that has counts, and checks them.
fn precheck<T: 'static>(buf: &DecodeBuf<'_>) -> Result<(), Status> {
    let count: fn(&[u8]) -> Option<RequestCounts> = if TypeId::of::<T>()
        == TypeId::of::<v1::GenerateRequest>()
        || TypeId::of::<T>() == TypeId::of::<v1::CachePromptRequest>()
    {
        // A CachePromptRequest's messages are field 1 too, and it has no field 4.
        RequestCounts::generate
    } else if TypeId::of::<T>() == TypeId::of::<v1::TokenizeRequest>() {
        RequestCounts::tokenize
    } else {
        return Ok(());
    };
    let Some(check) = request_check() else {
        return Ok(());
    };
    // tonic hands a message's bytes as one contiguous buffer; were it ever split, the
    // server's own count checks after decoding still apply.
    let bytes = buf.chunk();
    if bytes.len() < buf.remaining() {
        return Ok(());
    }
    match count(bytes) {
        Some(c) => check(&c).map_err(Status::invalid_argument),
        None => Ok(()),
    }
}

/// `ProstCodec` with decode errors reported as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = InputDecoder<<ProstCodec<T, U> as tonic::codec::Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InputDecoder(self.0.decoder())
    }
}

/// Wraps a decoder: checks request counts first, and turns its INTERNAL decode errors
/// into INVALID_ARGUMENT.
#[derive(Debug)]
pub struct InputDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for InputDecoder<D>
where
    D::Item: 'static,
{
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        precheck::<D::Item>(buf)?;
        self.0.decode(buf).map_err(|s| {
            if s.code() == Code::Internal {
                Status::invalid_argument(format!("malformed message: {}", s.message()))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
