//! A generator of Backup-NG-like export trees, and of the changes a day brings to them.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The shape of a generated tree.
#[derive(Debug, Clone)]
pub struct TreeSpec {
    /// Seed: the same spec makes the same tree, byte for byte, with the same mtimes.
    pub seed: u64,
    /// Accounts at the start.
    pub accounts: usize,
    /// Messages per account at the start.
    pub items_per_account: usize,
    /// Largest message BLOB, in bytes (sizes are log-normal: median about 7 KB, mean 60-100 KB).
    pub max_blob: u64,
    /// Fraction of new messages that get a hard link in the account's `links/` folder.
    pub hard_link_fraction: f64,
    /// Add a few symlinks (one of them dangling).
    pub symlinks: bool,
    /// Add odd names: case twins, `#`, spaces, bytes that are not UTF-8.
    pub odd_names: bool,
    /// Messages per account per day (mutations).
    pub new_items_per_day: usize,
}

impl TreeSpec {
    /// A tree of about `files` files.
    pub fn with_files(files: usize, seed: u64) -> Self {
        let accounts = (files / 2000).clamp(2, 500);
        let items_per_account = (files as f64 / (1.9 * accounts as f64)).max(1.0) as usize;
        Self {
            seed,
            accounts,
            items_per_account,
            max_blob: 8 << 20,
            hard_link_fraction: 0.02,
            symlinks: true,
            odd_names: true,
            new_items_per_day: (items_per_account / 50).clamp(2, 40),
        }
    }
}

/// What one day of changes did.
#[derive(Debug, Clone, Copy, Default)]
pub struct DayChanges {
    /// Files created.
    pub files_added: u64,
    /// Files rewritten.
    pub files_rewritten: u64,
    /// Files removed.
    pub files_removed: u64,
    /// Bytes of new or rewritten content.
    pub bytes_written: u64,
    /// Of those, bytes of fresh random content (new BLOBs and archives): incompressible and found in no
    /// other file, so that no tool can send them in fewer bytes.
    pub new_random_bytes: u64,
}

struct Account {
    uuid: String,
    items: Vec<u32>,
    next_item: u32,
}

/// A Backup-NG-like tree on disk that can age one day at a time.
pub struct TreeGenerator {
    root: PathBuf,
    spec: TreeSpec,
    rng: ChaCha8Rng,
    accounts: Vec<Account>,
    blobs: Vec<String>,
    server_files: Vec<PathBuf>,
    day: u32,
    changes: DayChanges,
}

/// 2026-01-05 00:00:00 UTC, day 0 of every generated tree.
const EPOCH: u64 = 1_767_571_200;

const WORDS: &[&str] = &[
    "invoice",
    "meeting",
    "quarterly",
    "report",
    "re:",
    "fwd:",
    "lunch",
    "project",
    "budget",
    "draft",
    "contract",
    "schedule",
    "update",
    "urgent",
    "review",
    "notes",
    "team",
    "offsite",
    "ticket",
    "backup",
    "server",
    "migration",
];

impl TreeGenerator {
    /// Creates the tree at `root` (which must not exist or be empty).
    pub fn create(root: &Path, spec: TreeSpec) -> io::Result<Self> {
        fs::create_dir_all(root)?;
        let mut generator = Self {
            root: root.to_owned(),
            rng: ChaCha8Rng::seed_from_u64(spec.seed),
            spec,
            accounts: Vec::new(),
            blobs: Vec::new(),
            server_files: Vec::new(),
            day: 0,
            changes: DayChanges::default(),
        };
        generator.write_file(Path::new("lock_5f3c2a1e-server"), b"")?;
        for _ in 0..generator.spec.accounts {
            let items = generator.spec.items_per_account;
            generator.new_account(items)?;
        }
        generator.server_archives()?;
        generator.write_backupstat()?;
        if generator.spec.symlinks {
            generator.symlinks()?;
        }
        if generator.spec.odd_names {
            generator.odd_names()?;
        }
        Ok(generator)
    }

    /// The tree's top folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many days have passed.
    pub fn day(&self) -> u32 {
        self.day
    }

    fn mtime(&mut self) -> SystemTime {
        let secs = EPOCH + u64::from(self.day) * 86_400 + 3600 + self.rng.random_range(0..7200);
        SystemTime::UNIX_EPOCH + Duration::new(secs, self.rng.random_range(0..1_000_000_000))
    }

    fn write_file(&mut self, rel: &Path, content: &[u8]) -> io::Result<()> {
        let path = self.root.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let existed = path.exists();
        let mut file = File::create(&path)?;
        file.write_all(content)?;
        file.set_modified(self.mtime())?;
        if existed {
            self.changes.files_rewritten += 1;
        } else {
            self.changes.files_added += 1;
        }
        self.changes.bytes_written += content.len() as u64;
        Ok(())
    }

    fn random_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.rng.fill(&mut data[..]);
        data
    }

    fn text(&mut self, words: usize) -> String {
        let mut out = String::new();
        for i in 0..words {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(WORDS[self.rng.random_range(0..WORDS.len())]);
        }
        out
    }

    /// A gzip-like message BLOB: a gzip header, then incompressible bytes, log-normally sized.
    fn blob(&mut self) -> io::Result<String> {
        if !self.blobs.is_empty() && self.rng.random_bool(0.15) {
            // A message to several local recipients: one BLOB, several metadata files.
            return Ok(self.blobs[self.rng.random_range(0..self.blobs.len())].clone());
        }
        let (u1, u2): (f64, f64) = (self.rng.random::<f64>().max(1e-12), self.rng.random());
        let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let size = ((7000f64.ln() + 2.0 * normal).exp() as u64).clamp(200, self.spec.max_blob) as usize;
        let mut data = vec![0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0x03];
        data.extend(self.random_bytes(size));
        self.changes.new_random_bytes += size as u64;
        let digest = blake3::hash(&data);
        let name = base64::engine::general_purpose::STANDARD.encode(digest.as_bytes()).replace('/', ",");
        let rel = PathBuf::from(format!("items/{}/{}", &name[..2], name));
        self.write_file(&rel, &data)?;
        self.blobs.push(name.clone());
        Ok(name)
    }

    fn metadata_json(&mut self, item: u32, blob: &str, transactions: usize) -> String {
        let mut json = String::from("[");
        for t in 0..transactions {
            if t > 0 {
                json.push(',');
            }
            json.push_str(&self.transaction(item, blob, t));
        }
        json.push(']');
        json
    }

    fn transaction(&mut self, item: u32, blob: &str, t: usize) -> String {
        let subject = self.text(6);
        let folder = self.rng.random_range(1..300);
        let flags = self.rng.random_range(0..64);
        let ts = EPOCH * 1000 + u64::from(self.day) * 86_400_000 + self.rng.random_range(0..86_400_000);
        format!(
            "{{\"txn\":{t},\"itemId\":{item},\"ts\":{ts},\"op\":\"{}\",\"folderId\":{folder},\"flags\":{flags},\
             \"tags\":[],\"digest\":\"{blob}\",\"subject\":\"{subject}\",\"size\":{}}}",
            if t == 0 { "create" } else { "modify" },
            self.rng.random_range(500..90_000)
        )
    }

    fn new_item(&mut self, account: usize) -> io::Result<()> {
        let blob = self.blob()?;
        let id = self.accounts[account].next_item;
        self.accounts[account].next_item += 1;
        self.accounts[account].items.push(id);
        let transactions = self.rng.random_range(1..4);
        let json = self.metadata_json(id, &blob, transactions);
        let uuid = self.accounts[account].uuid.clone();
        self.write_file(&PathBuf::from(format!("accounts/{uuid}/items/{:02}/{id}", id % 100)), json.as_bytes())?;
        if self.rng.random_bool(self.spec.hard_link_fraction) {
            let link = self.root.join(format!("accounts/{uuid}/links/{id}"));
            fs::create_dir_all(link.parent().unwrap_or(&self.root))?;
            fs::hard_link(self.root.join(format!("items/{}/{}", &blob[..2], blob)), &link)?;
            self.changes.files_added += 1;
        }
        Ok(())
    }

    fn new_account(&mut self, items: usize) -> io::Result<()> {
        let b = self.random_bytes(16);
        let uuid =
            format!("{}-{}-{}-{}-{}", hex(&b[..4]), hex(&b[4..6]), hex(&b[6..8]), hex(&b[8..10]), hex(&b[10..16]));
        self.accounts.push(Account { uuid: uuid.clone(), items: Vec::new(), next_item: 257 });
        let account = self.accounts.len() - 1;
        let info_len = self.rng.random_range(60..600);
        let info = format!("{{\"uuid\":\"{uuid}\",\"attrs\":\"{}\"}}", self.text(info_len));
        self.write_file(&PathBuf::from(format!("accounts/{uuid}/account_info")), info.as_bytes())?;
        self.account_stats(account)?;
        for _ in 0..items {
            self.new_item(account)?;
        }
        Ok(())
    }

    fn account_stats(&mut self, account: usize) -> io::Result<()> {
        let uuid = self.accounts[account].uuid.clone();
        let stat = format!(
            "{{\"items\":{},\"day\":{},\"quota\":{}}}",
            self.accounts[account].items.len(),
            self.day,
            self.rng.random_range(0..1u64 << 32)
        );
        self.write_file(&PathBuf::from(format!("accounts/{uuid}/account_stat")), stat.as_bytes())?;
        self.write_file(&PathBuf::from(format!("accounts/{uuid}/backupstat")), stat.as_bytes())
    }

    fn write_backupstat(&mut self) -> io::Result<()> {
        let stat =
            format!("{{\"accounts\":{},\"blobs\":{},\"day\":{}}}", self.accounts.len(), self.blobs.len(), self.day);
        self.write_file(Path::new("backupstat"), stat.as_bytes())
    }

    fn server_archives(&mut self) -> io::Result<()> {
        for old in std::mem::take(&mut self.server_files) {
            fs::remove_file(self.root.join(old))?;
            self.changes.files_removed += 1;
        }
        let (dd, mm) = (5 + self.day % 20, 1 + self.day / 20 % 12);
        for component in ["ldap", "config", "zimlets", "customizations"] {
            let size = self.rng.random_range(20_000..200_000);
            let mut data = vec![0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0x03];
            data.extend(self.random_bytes(size));
            self.changes.new_random_bytes += size as u64;
            let rel = PathBuf::from(format!("server/{component}_{dd:02}_{mm:02}_26#02_{:02}_00.tar.gz", self.day % 60));
            self.write_file(&rel, &data)?;
            self.server_files.push(rel);
        }
        Ok(())
    }

    fn symlinks(&mut self) -> io::Result<()> {
        let uuid = self.accounts[0].uuid.clone();
        std::os::unix::fs::symlink(format!("accounts/{uuid}"), self.root.join("first-account"))?;
        std::os::unix::fs::symlink("../no-such-file", self.root.join(format!("accounts/{uuid}/dangling")))?;
        std::os::unix::fs::symlink("account_info", self.root.join(format!("accounts/{uuid}/info-link")))?;
        self.changes.files_added += 3;
        Ok(())
    }

    fn odd_names(&mut self) -> io::Result<()> {
        let uuid = self.accounts[0].uuid.clone();
        let dir = self.root.join(format!("accounts/{uuid}/drive_items/ab"));
        fs::create_dir_all(&dir)?;
        for name in [&b"Case"[..], b"case", b"with space", b"hash#tag", b"latin1-\xe9t\xe9", b"=+,_.-"] {
            let content = self.text(20);
            let rel = dir.strip_prefix(&self.root).unwrap_or(&dir).join(std::ffi::OsStr::from_bytes(name));
            self.write_file(&rel, content.as_bytes())?;
        }
        fs::create_dir_all(self.root.join(format!("accounts/{uuid}/drive_items/empty-folder")))?;
        Ok(())
    }

    /// One day of a live server: new messages for most accounts, some metadata rewritten and grown,
    /// statistics rewritten, a new account, new `server/` archives replacing the old ones.
    pub fn next_day(&mut self) -> io::Result<DayChanges> {
        self.day += 1;
        self.changes = DayChanges::default();
        for account in 0..self.accounts.len() {
            if self.rng.random_bool(0.8) {
                let n = self.rng.random_range(1..=self.spec.new_items_per_day);
                for _ in 0..n {
                    self.new_item(account)?;
                }
            }
            // 1-3% of metadata files get a new transaction appended.
            let items = self.accounts[account].items.clone();
            let share = self.rng.random_range(0.01..0.03);
            for &id in &items {
                if self.rng.random_bool(share) {
                    self.grow_item(account, id)?;
                }
            }
            self.account_stats(account)?;
            if self.rng.random_bool(0.05) {
                let uuid = self.accounts[account].uuid.clone();
                let info_len = self.rng.random_range(60..600);
                let info = format!("{{\"uuid\":\"{uuid}\",\"attrs\":\"{}\"}}", self.text(info_len));
                self.write_file(&PathBuf::from(format!("accounts/{uuid}/account_info")), info.as_bytes())?;
            }
        }
        let items = self.spec.items_per_account / 4 + 1;
        self.new_account(items)?;
        self.server_archives()?;
        self.write_backupstat()?;
        Ok(self.changes)
    }

    fn grow_item(&mut self, account: usize, id: u32) -> io::Result<()> {
        let uuid = self.accounts[account].uuid.clone();
        let rel = PathBuf::from(format!("accounts/{uuid}/items/{:02}/{id}", id % 100));
        let mut json = fs::read_to_string(self.root.join(&rel))?;
        if json.ends_with(']') {
            json.pop();
            let t = json.matches("\"txn\"").count();
            let txn = self.transaction(id, "-", t);
            json.push(',');
            json.push_str(&txn);
            json.push(']');
        }
        self.write_file(&rel, json.as_bytes())
    }

    /// A `doExport` into a fresh folder: every file rewritten with the same bytes and a new mtime.
    pub fn fresh_export(&mut self) -> io::Result<DayChanges> {
        self.day += 1;
        self.changes = DayChanges::default();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for child in fs::read_dir(&dir)? {
                let child = child?;
                let kind = child.file_type()?;
                if kind.is_dir() {
                    stack.push(child.path());
                } else if kind.is_file() {
                    let file = File::options().write(true).open(child.path())?;
                    file.set_modified(self.mtime())?;
                    self.changes.files_rewritten += 1;
                }
            }
        }
        Ok(self.changes)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_tree_and_days_change_it() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let spec = TreeSpec::with_files(300, 9);
        let mut ga = TreeGenerator::create(a.path(), spec.clone()).unwrap();
        TreeGenerator::create(b.path(), spec).unwrap();
        // Folder and symlink mtimes are the time of the run; files' are the seed's.
        let files_only = |path: &Path| {
            let mut snap = crate::snapshot(path, &[]).unwrap();
            for node in snap.values_mut() {
                if !matches!(node.kind, crate::NodeKind::File(_)) {
                    node.mtime_ns = 0;
                }
            }
            snap
        };
        let (sa, sb) = (files_only(a.path()), files_only(b.path()));
        crate::compare_trees(&sa, &sb, |_| false).unwrap();
        let files = sa.values().filter(|n| matches!(n.kind, crate::NodeKind::File(_))).count();
        assert!(files > 250 && files < 450, "{files} files");
        assert!(sa.keys().any(|p| p.starts_with(b"items/")));
        let day = ga.next_day().unwrap();
        assert!(day.files_added > 0 && day.files_rewritten > 0 && day.files_removed == 4);
        // The new BLOBs and archives are random; the metadata written beside them is not.
        assert!(day.new_random_bytes > 0 && day.new_random_bytes < day.bytes_written, "{day:?}");
        let after = crate::snapshot(a.path(), &[]).unwrap();
        assert!(crate::compare_trees(&sa, &after, |_| true).is_err());
        assert_eq!(ga.fresh_export().unwrap().new_random_bytes, 0);
        let fresh = crate::snapshot(a.path(), &[]).unwrap();
        let same_bytes = after.iter().all(|(p, n)| fresh.get(p).is_some_and(|f| f.kind == n.kind));
        assert!(same_bytes);
        assert!(crate::compare_trees(&after, &fresh, |_| false).is_err(), "mtimes must move");
    }
}
