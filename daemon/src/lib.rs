//! The daemon's modules as a library: the `gemmad` binary (`main.rs`) is a thin CLI over
//! them, and the fuzz targets (`fuzz/`) call the config parser and the gRPC request
//! conversion and checks directly. Not a stable API.

pub mod config;
pub mod core;
pub mod dbus;
pub mod export;
pub mod governor;
pub mod grpc;
pub mod http;
pub mod oneshot;
pub mod pull;
pub mod serve;
pub mod systemd;
