//! Owners by name: the source records user and group names beside the numbers, the destination maps
//! names back to its own numbers (falling back to the source's numbers), as rsync does without
//! `--numeric-ids`.

use std::collections::HashMap;

/// Looks up and caches the names of numeric owners on the source.
#[derive(Debug, Default)]
pub struct OwnerNames {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

impl OwnerNames {
    /// The user name of `uid`, if it has one.
    pub fn user(&mut self, uid: u32) -> Option<String> {
        self.user_name(uid).map(str::to_owned)
    }

    /// The group name of `gid`, if it has one.
    pub fn group(&mut self, gid: u32) -> Option<String> {
        self.group_name(gid).map(str::to_owned)
    }

    /// [`OwnerNames::user`], borrowed.
    pub fn user_name(&mut self, uid: u32) -> Option<&str> {
        self.users
            .entry(uid)
            .or_insert_with(|| uzers::get_user_by_uid(uid).and_then(|u| u.name().to_str().map(str::to_owned)))
            .as_deref()
    }

    /// [`OwnerNames::group`], borrowed.
    pub fn group_name(&mut self, gid: u32) -> Option<&str> {
        self.groups
            .entry(gid)
            .or_insert_with(|| uzers::get_group_by_gid(gid).and_then(|g| g.name().to_str().map(str::to_owned)))
            .as_deref()
    }
}

/// Maps a source's owners to this machine's.
#[derive(Debug)]
pub struct OwnerMap {
    numeric: bool,
    can_chown: bool,
    users: HashMap<String, Option<u32>>,
    groups: HashMap<String, Option<u32>>,
}

impl OwnerMap {
    /// `numeric`: use the source's numbers as they are. Owners are only changed when running as root.
    pub fn new(numeric: bool) -> Self {
        Self { numeric, can_chown: rustix::process::geteuid().is_root(), users: HashMap::new(), groups: HashMap::new() }
    }

    /// The owner and group to give a file, or `None` when this process cannot change owners.
    pub fn resolve(&mut self, uid: u32, gid: u32, user: Option<&str>, group: Option<&str>) -> Option<(u32, u32)> {
        if !self.can_chown {
            return None;
        }
        if self.numeric {
            return Some((uid, gid));
        }
        let uid = user
            .and_then(|name| {
                *self.users.entry(name.to_owned()).or_insert_with(|| uzers::get_user_by_name(name).map(|u| u.uid()))
            })
            .unwrap_or(uid);
        let gid = group
            .and_then(|name| {
                *self.groups.entry(name.to_owned()).or_insert_with(|| uzers::get_group_by_name(name).map(|g| g.gid()))
            })
            .unwrap_or(gid);
        Some((uid, gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_maps_by_name_with_numeric_fallback() {
        let mut map = OwnerMap::new(false);
        if !map.can_chown {
            assert_eq!(map.resolve(5, 6, Some("root"), None), None);
            return;
        }
        assert_eq!(map.resolve(4242, 4343, Some("root"), Some("root")), Some((0, 0)));
        assert_eq!(map.resolve(4242, 4343, Some("no-such-user-here"), None), Some((4242, 4343)));
        let mut numeric = OwnerMap::new(true);
        assert_eq!(numeric.resolve(4242, 4343, Some("root"), Some("root")), Some((4242, 4343)));
    }

    #[test]
    fn names_are_found() {
        let mut names = OwnerNames::default();
        assert_eq!(names.user(0).as_deref(), Some("root"));
        assert_eq!(names.group(0).as_deref(), Some("root"));
    }
}
