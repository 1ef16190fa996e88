//! The config folder (identity, `ferry.toml`) and where state lives: the one place that reads and
//! writes `ferry.toml`, through its checker.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::{CONFIG_FILE, Config, default_dir};
use crate::config_check::{Problem, check};

/// The config folder: identity, `ferry.toml`.
#[derive(Debug, Clone)]
pub struct ConfigDir {
    dir: PathBuf,
    data_dir: Option<PathBuf>,
}

impl ConfigDir {
    /// `dir`, or the default: `/etc/ferry` for root, else `$XDG_CONFIG_HOME/ferry` or `~/.config/ferry`.
    pub fn new(dir: Option<PathBuf>) -> Self {
        let dir = dir.unwrap_or_else(|| default_dir("/etc/ferry", "XDG_CONFIG_HOME", ".config"));
        Self { dir: std::path::absolute(&dir).unwrap_or(dir), data_dir: None }
    }

    /// Overrides where state lives (`--data-dir`).
    pub fn with_data_dir(mut self, data_dir: Option<PathBuf>) -> Self {
        self.data_dir = data_dir.map(|d| std::path::absolute(&d).unwrap_or(d));
        self
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The config file.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// Reads `ferry.toml`.
    pub fn load(&self) -> anyhow::Result<Config> {
        let path = self.config_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("no {} yet: run `ferry init` first (or pass --config-dir)", path.display())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        match check(&text) {
            Ok((config, _warnings)) => Ok(config),
            Err(problems) => Err(invalid(&path, &problems)),
        }
    }

    /// Writes `ferry.toml` atomically and durably, keeping what a person wrote in it (comments, order,
    /// layout) around what changed.
    pub fn save(&self, config: &Config) -> anyhow::Result<()> {
        let path = self.config_file();
        let text = toml::to_string_pretty(config).context("cannot serialise the config")?;
        let text = match std::fs::read_to_string(&path) {
            Ok(old) => crate::toml_keep::keep_layout(&old, &text).context("cannot lay the change over the file")?,
            Err(_) => text,
        };
        // What every later command would refuse to load is not written.
        if let Err(problems) = check(&text) {
            let why: Vec<String> = problems.iter().map(|p| format!("\n  {}: {}", p.key, p.message)).collect();
            bail!("{} was left as it was: the change would make it invalid:{}", path.display(), why.concat());
        }
        crate::helpers::write_durably(&path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Where state lives: `--data-dir`, else the config's `data_dir`, else `/var/lib/ferry` beside `/etc/ferry`, else
    /// `data/` inside the config folder.
    pub fn data_dir(&self, config: &Config) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        if let Some(dir) = &config.data_dir {
            return dir.clone();
        }
        if self.dir == Path::new("/etc/ferry") {
            return PathBuf::from("/var/lib/ferry");
        }
        self.dir.join("data")
    }
}

/// The error for a config file with problems: each on its own line, with where it is.
pub(crate) fn invalid(path: &Path, problems: &[Problem]) -> anyhow::Error {
    let lines: Vec<String> = problems.iter().map(|p| format!("\n  {}:{p}", path.display())).collect();
    anyhow::anyhow!(
        "{} is not a valid ferry config (`ferry config check` checks it after an edit):{}",
        path.display(),
        lines.concat()
    )
}
