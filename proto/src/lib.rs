//! gemmad-proto: the wire API of gemmad (`gemmad.proto`, package `gemmad.v1`) and the
//! tonic/prost code generated from it at build time (no system `protoc` needed).

pub mod codec;
pub mod wire;

/// Messages, the `Gemmad` client and the `Gemmad` server trait of `gemmad.v1`.
pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("gemmad.v1");
}

/// The encoded `FileDescriptorSet` of gemmad.proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gemmad_descriptor.bin"));

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = "gemmad.v1.Gemmad";
