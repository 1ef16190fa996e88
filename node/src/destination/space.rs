//! The disk space a round needs on the destination, against what there is.

use std::path::Path;

use anyhow::Context;
use ferry_engine::{EntryKind, RecordReader, Step};
use ferry_proto::Change;

/// The disk space a round needs on the destination, and what there is.
pub(super) struct Space {
    /// Files the round writes.
    pub(super) files: u64,
    /// Their bytes: each is built beside the old version before it replaces it.
    pub(super) needed: u64,
    /// Free bytes for the target (for an unprivileged user).
    pub(super) available: u64,
    /// The filesystem's size.
    pub(super) total: u64,
}

impl Space {
    /// What the round's `steps` write: a file the target does not hold as the source has it (new,
    /// changed, or found missing or changed in place by the check).
    pub(super) fn of_round(steps: impl Iterator<Item = anyhow::Result<Step>>, target: &Path) -> anyhow::Result<Self> {
        let mut space = Self::with(0, 0, target)?;
        for step in steps {
            space.count(&step?);
        }
        Ok(space)
    }

    /// Counts `step` if it writes a file's content; says whether it does.
    pub(super) fn count(&mut self, step: &Step) -> bool {
        let Some(new) =
            step.pair().filter(|pair| ferry_engine::Planner::writes_content(pair)).and_then(|p| p.new.as_ref())
        else {
            return false;
        };
        self.files += 1;
        self.needed = self.needed.saturating_add(new.size);
        true
    }

    /// Like [`Space::of_round`], for changes against the committed manifest of a target the check
    /// found as ferry left it: a file whose content changed is one the round writes. (The one case
    /// this misses, a hard link whose content did not change becoming a file of its own, is rare and
    /// small beside the margin.)
    pub(super) fn of_changes(changes: RecordReader<Change>, target: &Path) -> anyhow::Result<Self> {
        let mut space = Self::with(0, 0, target)?;
        for change in changes {
            space.add(&change?);
        }
        Ok(space)
    }

    /// Counts `change` if it is a file whose content the round writes; says whether it was.
    fn add(&mut self, change: &Change) -> bool {
        let Some(entry) = &change.entry else { return false };
        if entry.kind != EntryKind::File || entry.hard_link_to.is_some() || change.content_as_before {
            return false;
        }
        self.files += 1;
        self.needed = self.needed.saturating_add(entry.size);
        true
    }

    /// A round that writes `files` files of `needed` bytes into `target`'s filesystem.
    pub(super) fn with(files: u64, needed: u64, target: &Path) -> anyhow::Result<Self> {
        let stat = rustix::fs::statvfs(target)
            .with_context(|| format!("cannot read the free space of {}", target.display()))?;
        Ok(Self {
            files,
            needed,
            available: stat.f_bavail.saturating_mul(stat.f_frsize),
            total: stat.f_blocks.saturating_mul(stat.f_frsize),
        })
    }

    /// Room kept free beyond the round's own bytes: 2% of the filesystem (at most 1 GiB), plus 1 MiB
    /// for folders and ferry's state.
    pub(super) fn margin(&self) -> u64 {
        (self.total / 50).min(1 << 30) + (1 << 20)
    }

    /// Why the round cannot start, if it cannot.
    pub(super) fn refusal(&self, target: &Path) -> Option<String> {
        let wanted = self.needed.saturating_add(self.margin());
        (wanted > self.available).then(|| {
            format!(
                "not enough space in {}: the round writes {} files ({}), which needs {} with the margin, and {} is free; free some space or grow the filesystem, then run the round again",
                target.display(),
                crate::human::count(self.files),
                crate::human::bytes(self.needed),
                crate::human::bytes(wanted),
                crate::human::bytes(self.available)
            )
        })
    }
}
