//! How much memory this process may use: what bounds the page cache it can count on to keep what
//! it read until it reads it again.

use std::path::{Path, PathBuf};

/// The smallest memory limit of this process's control groups and their parents (cgroup v2's
/// `memory.max`, v1's `memory.limit_in_bytes`) and of the machine (`MemTotal`), if any is known.
pub(crate) fn limit() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let in_groups = groups.lines().filter_map(group_limit).min();
    [in_groups, machine_memory()].into_iter().flatten().min()
}

/// The limit of the memory controller's group on one line of `/proc/self/cgroup`
/// (`id:controllers:path`), the smallest from it up to the hierarchy's root.
fn group_limit(line: &str) -> Option<u64> {
    let mut fields = line.splitn(3, ':');
    let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
    let (root, file) = match controllers {
        "" => (PathBuf::from("/sys/fs/cgroup"), "memory.max"),
        list if list.split(',').any(|c| c == "memory") => {
            (PathBuf::from("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")
        }
        _ => return None,
    };
    let mut group = Some(Path::new(path.trim_start_matches('/')));
    let mut smallest: Option<u64> = None;
    while let Some(at) = group {
        // "max" (v2) and a page-rounded i64::MAX (v1) mean none.
        let set = std::fs::read_to_string(root.join(at).join(file))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .filter(|limit| *limit < 1 << 62);
        smallest = match (smallest, set) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        group = at.parent();
    }
    smallest
}

fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_at_most_the_machine_s_memory_and_lines_of_other_controllers_say_nothing() {
        let machine = machine_memory().expect("MemTotal in /proc/meminfo");
        assert!(limit().is_some_and(|limit| limit <= machine && limit > 0));
        assert_eq!(group_limit("7:blkio:/"), None);
        assert_eq!(group_limit("not a line"), None);
    }
}
