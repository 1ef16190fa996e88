//! BLAKE3 newtypes: [`ChunkHash`] names a piece of content, [`RootHash`] a whole manifest.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A hash string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("not a BLAKE3 hash (expected 64 hex digits): {0:?}")]
pub struct ParseHashError(String);

macro_rules! blake3_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// The hash as raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Wraps raw hash bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The first 8 hex digits, for logs.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(hash: blake3::Hash) -> Self {
                Self(*hash.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseHashError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut bytes = [0u8; 32];
                hex::decode_to_slice(s, &mut bytes).map_err(|_| ParseHashError(s.to_owned()))?;
                Ok(Self(bytes))
            }
        }

        /// Hex in human-readable formats (TOML, JSON), 32 raw bytes in postcard.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.collect_str(self)
                } else {
                    self.0.serialize(serializer)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let s = String::deserialize(deserializer)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; 32]>::deserialize(deserializer).map(Self)
                }
            }
        }
    };
}

blake3_newtype!(
    /// The BLAKE3 hash of one chunk of file content: the chunk's name everywhere in ferry.
    ChunkHash
);

blake3_newtype!(
    /// The BLAKE3 hash over a whole manifest: two trees with the same root hash are the same.
    RootHash
);

impl ChunkHash {
    /// Hashes a chunk's bytes.
    pub fn of(data: &[u8]) -> Self {
        blake3::hash(data).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let hash = ChunkHash::of(b"hello");
        let text = hash.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ChunkHash>().unwrap(), hash);
        assert!("zz".parse::<ChunkHash>().is_err());
        assert_eq!(hash.short(), &text[..8]);
    }

    #[test]
    fn postcard_is_raw_bytes() {
        let hash = ChunkHash::of(b"hello");
        let bytes = postcard::to_allocvec(&hash).unwrap();
        assert_eq!(&bytes[..], hash.as_bytes());
        assert_eq!(postcard::from_bytes::<ChunkHash>(&bytes).unwrap(), hash);
    }
}
