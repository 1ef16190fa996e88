//! [`SpillQueue`]: a first-in first-out list that moves to an anonymous temporary file when it grows,
//! so that memory stays bounded however many items a round produces.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Items kept in memory before they go to disk.
const IN_MEMORY: usize = 16 * 1024;

/// A queue of items, in memory while small, on disk beyond that.
pub(crate) struct SpillQueue<T> {
    memory: Vec<T>,
    file: Option<BufWriter<File>>,
    spilled: u64,
}

impl<T: Serialize + DeserializeOwned> SpillQueue<T> {
    pub(crate) fn new() -> Self {
        Self { memory: Vec::new(), file: None, spilled: 0 }
    }

    pub(crate) fn push(&mut self, item: T) -> io::Result<()> {
        self.memory.push(item);
        if self.memory.len() >= IN_MEMORY {
            if self.file.is_none() {
                self.file = Some(BufWriter::new(tempfile::tempfile()?));
            }
            let Some(file) = self.file.as_mut() else { unreachable!("created above") };
            for item in self.memory.drain(..) {
                let bytes = postcard::to_stdvec(&item).map_err(io::Error::other)?;
                file.write_all(&(bytes.len() as u32).to_le_bytes())?;
                file.write_all(&bytes)?;
                self.spilled += 1;
            }
        }
        Ok(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.memory.is_empty() && self.spilled == 0
    }

    /// All items in the order they were pushed.
    pub(crate) fn drain(self) -> io::Result<impl Iterator<Item = io::Result<T>>> {
        let mut reader = match self.file {
            Some(file) => {
                let mut file = file.into_inner().map_err(|e| e.into_error())?;
                file.rewind()?;
                Some(BufReader::new(file))
            }
            None => None,
        };
        let mut left = self.spilled;
        let from_disk = std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            let reader = reader.as_mut()?;
            let mut len = [0u8; 4];
            let result = reader.read_exact(&mut len).and_then(|()| {
                let mut bytes = vec![0u8; u32::from_le_bytes(len) as usize];
                reader.read_exact(&mut bytes)?;
                postcard::from_bytes(&bytes).map_err(io::Error::other)
            });
            Some(result)
        });
        Ok(from_disk.chain(self.memory.into_iter().map(Ok)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_across_the_spill() {
        let mut queue = SpillQueue::new();
        for i in 0..(IN_MEMORY as u64 * 2 + 5) {
            queue.push(i).unwrap();
        }
        let all: Vec<u64> = queue.drain().unwrap().map(Result::unwrap).collect();
        assert_eq!(all, (0..(IN_MEMORY as u64 * 2 + 5)).collect::<Vec<_>>());
    }
}
