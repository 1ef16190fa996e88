//! Changes to `ferry.toml` that keep what a person wrote there: comments, blank lines, the order of
//! tables and keys, and the layout of every value the change leaves alone.

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, Value};

/// `new` (the whole config, as toml writes it) laid over `old` (the file as it is): keys and tables
/// that did not change are kept byte for byte, changed values keep their comments, new ones go at
/// the end of their table, and what `new` no longer has goes. A file that does not parse is replaced.
pub(crate) fn keep_layout(old: &str, new: &str) -> Result<String, toml_edit::TomlError> {
    let new: DocumentMut = new.parse()?;
    let Ok(mut doc) = old.parse::<DocumentMut>() else { return Ok(new.to_string()) };
    merge_table(doc.as_table_mut(), new.as_table());
    Ok(doc.to_string())
}

fn merge_table(old: &mut Table, new: &Table) {
    let gone: Vec<String> = old.iter().map(|(key, _)| key.to_owned()).filter(|key| !new.contains_key(key)).collect();
    for key in gone {
        old.remove(&key);
    }
    for (key, item) in new.iter() {
        match (old.get_mut(key), item) {
            (Some(Item::Table(old)), Item::Table(new)) => merge_table(old, new),
            (Some(Item::ArrayOfTables(old)), Item::ArrayOfTables(new)) => merge_tables(old, new),
            (Some(Item::Value(old)), Item::Value(new)) => {
                if bare(old) != bare(new) {
                    let decor = old.decor().clone();
                    *old = new.clone();
                    *old.decor_mut() = decor;
                }
            }
            (_, item) => {
                old.insert(key, item.clone());
            }
        }
    }
}

/// `[[peer]]` and `[[job]]` tables are matched by their `name` (a peer renamed by `trust`, by its `id`).
fn merge_tables(old: &mut ArrayOfTables, new: &ArrayOfTables) {
    let field = |table: &Table, key: &str| table.get(key).and_then(Item::as_str).map(str::to_owned);
    let same = |a: &Table, b: &Table| {
        field(a, "name").is_some() && field(a, "name") == field(b, "name")
            || field(a, "id").is_some() && field(a, "id") == field(b, "id")
    };
    let mut merged = ArrayOfTables::new();
    for table in old.iter() {
        if let Some(new) = new.iter().find(|new| same(table, new)) {
            let mut table = table.clone();
            merge_table(&mut table, new);
            merged.push(table);
        }
    }
    for table in new.iter() {
        if !old.iter().any(|old| same(old, table)) {
            merged.push(table.clone());
        }
    }
    *old = merged;
}

/// A value without its surrounding spaces and comments.
fn bare(value: &Value) -> String {
    let mut value = value.clone();
    value.decor_mut().clear();
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BY_HAND: &str = r#"# OPS-1234: the old server, until the cut-over
listen = "[::]:7373"   # all interfaces

# the Zimbra 8 box
[[peer]]
name = "old-mail"
id = "aaaa"
addr = "10.0.0.5:7373" # via VPN

[[job]]
name = "zimbra"   # the nightly export
path = "/opt/zimbra/backup/ng"
peer = "old-mail"

# keep: the archive job
[[job]]
name = "archive"
path = "/srv/archive"
peer = "old-mail"
"#;

    #[test]
    fn a_change_keeps_every_comment_and_the_layout_around_it() {
        // What toml writes for the config after `job set zimbra --bwlimit 10M --path /backup`:
        let new = r#"listen = "[::]:7373"

[[peer]]
name = "old-mail"
id = "aaaa"
addr = "10.0.0.5:7373"

[[job]]
name = "zimbra"
path = "/backup"
peer = "old-mail"
bwlimit = "10M"

[[job]]
name = "archive"
path = "/srv/archive"
peer = "old-mail"
"#;
        let expected = BY_HAND
            .replace(r#"path = "/opt/zimbra/backup/ng""#, r#"path = "/backup""#)
            .replace("peer = \"old-mail\"\n\n# keep", "peer = \"old-mail\"\nbwlimit = \"10M\"\n\n# keep");
        assert_eq!(keep_layout(BY_HAND, new).unwrap(), expected);
    }

    #[test]
    fn removed_tables_and_keys_go_and_new_ones_come_last() {
        let new = r#"[[peer]]
name = "old-mail"
id = "aaaa"

[[peer]]
name = "new-mail"
id = "bbbb"

[[job]]
name = "archive"
path = "/srv/archive"
peer = "old-mail"
"#;
        let out = keep_layout(BY_HAND, new).unwrap();
        assert!(!out.contains("zimbra") && !out.contains("listen") && !out.contains("via VPN"), "{out}");
        assert!(out.contains("# the Zimbra 8 box\n[[peer]]\nname = \"old-mail\""), "{out}");
        assert!(out.contains("# keep: the archive job\n[[job]]\nname = \"archive\""), "{out}");
        assert!(out.find("new-mail").unwrap() > out.find("old-mail").unwrap(), "{out}");
        assert_eq!(out.parse::<DocumentMut>().unwrap().to_string(), out);
    }

    #[test]
    fn a_file_that_does_not_parse_is_replaced() {
        assert_eq!(keep_layout("this is [not toml", "a = 1\n").unwrap(), "a = 1\n");
    }
}
