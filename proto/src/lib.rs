//! Athanor's wire protocol: the `.proto` files under `athanor/v1/` and the tonic/prost code
//! generated from them, plus the protocol version and the conversions of the
//! secure-aggregation messages to and from core's types ([`secagg`]), which both sides need.

/// Generated types and services of package `athanor.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("athanor.v1");
}

pub mod secagg;

/// The protocol version a node sends when it joins; a coordinator refuses any other.
///
/// Bump it whenever a change to `athanor/v1` would make old and new peers misunderstand each
/// other (a field's meaning changes, a required stage is added).
pub const PROTOCOL_VERSION: u32 = 2;

/// Size of the chunks models and updates are streamed in. Well below gRPC's default 4 MiB
/// message limit, so no peer needs its limits raised.
pub const CHUNK_BYTES: usize = 1 << 20;
