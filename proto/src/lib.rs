//! ferry's wire protocol, without any I/O.
//!
//! Goals: a round's messages, encoded with postcard in length-prefixed frames whose length is checked
//! against [`MAX_FRAME_LEN`] before anything is allocated; a decoder that never panics on any input
//! (a property test feeds it garbage); the round itself as two state machines in the manner of
//! quinn-proto's `Connection`, [`SourceRound`] and [`DestinationRound`] (messages and time in, messages,
//! things to do and the next timeout out), tested back to back without sockets; refusals as codes
//! ([`Refusal`]); the destination window's bookkeeping ([`window`]); a wire format frozen by golden
//! tests. Non-goals: sockets, clocks, files.
//!
//! The version is in the ALPN string ([`ALPN`]): peers that do not speak the same version never get
//! past the handshake. Postcard encodes enum variants by index: variants are only ever appended.
//!
//! A round (push: the source connects):
//!
//! ```text
//! source                                   destination
//! Hello{job, base}              ──────▶
//! RoundOptions{import}          ──────▶
//!                               ◀──────    Notice* Welcome{holds} | Refused{refusal, reason}
//! Changes{..}* ChangesEnd{root} ──────▶    (changes since `holds`, or everything: sent as the
//! (Scanning* while it waits)                scan goes, planned as they come)
//!                               ◀──────    Need{chunks}*, Passed{place}*  (before ChangesEnd too)
//! ChunkBatch* (data streams)    ──────▶    Missing{..} on control for what cannot be read
//!                               ◀──────    Need ... until Done
//!                               ◀──────    Committed{round, root} | Failed{reason}
//!                               ◀──────    ImportStarted, ImportDone{success, tail}   (when configured)
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod batch;
mod destination;
mod frame;
mod message;
pub mod packed;
mod refusal;
mod source;
pub mod window;

pub use destination::{
    DestinationEnd, DestinationEvent, DestinationInput, DestinationRound, Phase, ProtocolError, STOPPED_BATCHES_WAIT,
};
pub use frame::{DecodeError, EncodeError, MAX_FRAME_LEN, bytes_missing, decode, encode, encode_chunk_batch};
pub use message::{
    ALPN, Change, ChangesEnd, Checked, ChunkAt, ChunkBatch, Codec, Committed, Hello, ImportMode, ImportResult, Message,
    NeedChunk, OLDER_ALPNS, PROTOCOL_VERSION, Plan, RoundOptions, RoundRef, Transmit,
};
pub use refusal::Refusal;
pub use source::{
    PAUSE_NOTICE, STOP_WAIT, SourceConfig, SourceEnd, SourceEvent, SourceInput, SourcePhase, SourceRound,
};
