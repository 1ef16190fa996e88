//! `ferry.toml`: its peers and jobs, and what they say (limits, hooks, names).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ferry_certs::NodeId;
use serde::{Deserialize, Serialize};

/// The config file's name inside the config folder.
pub const CONFIG_FILE: &str = "ferry.toml";
/// The port `ferry serve` listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7373;

/// A node's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where `ferry serve` listens (default `[::]:7373`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Where round state lives (default: see [`ConfigDir::data_dir`](crate::config_dir::ConfigDir::data_dir)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// A node_exporter textfile to rewrite after every round (each job's last round, both sides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_file: Option<PathBuf>,
    /// Trusted peers.
    #[serde(default, rename = "peer", skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
    /// Jobs.
    #[serde(default, rename = "job", skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobConfig>,
}

/// A pinned peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The name jobs refer to it by.
    pub name: String,
    /// Its node ID, as its `ferry init` printed it.
    pub id: NodeId,
    /// Where to reach it (`host:port`), for peers this node sends to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Source: the bandwidth limit or timetable for rounds sent to this peer (see `sync --bwlimit`),
    /// unless the job or the command line sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<String>,
    /// Destination: the most this peer may send here, a rate or a timetable like `bwlimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_bwlimit: Option<String>,
}

/// A job: on the source, the folder to send and to which peer; on the destination, the target folder
/// and the one peer allowed to write it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// The job's name, the same on both nodes.
    pub name: String,
    /// The source folder, or the target folder.
    pub path: PathBuf,
    /// The peer's name.
    pub peer: String,
    /// Destination: the import to run after each committed round, e.g.
    /// `zxsuite backup doExternalRestore {target}`. Split into words like a shell would, never run
    /// through one; `{target}`, `{job}` and `{round}` are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_cmd: Option<String>,
    /// Destination: the provisioning-only import, for `sync --import provisioning-only`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_provisioning_cmd: Option<String>,
    /// Destination: how long an import may run before it is killed (e.g. `12h`; default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_timeout: Option<String>,
    /// Destination: the user the import runs as (default: the daemon's user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_user: Option<String>,
    /// Source: run before each round's scan, e.g. `zxsuite backup doSmartScan`; the round fails if it
    /// fails. Split into words like `import_cmd`; `{source}` and `{job}` are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_cmd: Option<String>,
    /// Source: the user the export command runs as (default: the user running `sync`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_user: Option<String>,
    /// Source: the bandwidth limit or timetable for this job's rounds (see `sync --bwlimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<String>,
}

impl PeerConfig {
    /// A peer with no limits.
    pub fn new(name: &str, id: NodeId, addr: Option<String>) -> Self {
        Self { name: name.to_owned(), id, addr, bwlimit: None, receive_bwlimit: None }
    }
}

impl Config {
    /// The peer called `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// The peer with node ID `id`.
    pub fn peer_by_id(&self, id: NodeId) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// The job called `name`.
    pub fn job(&self, name: &str) -> Option<&JobConfig> {
        self.jobs.iter().find(|j| j.name == name)
    }
}

/// `system` for root; else `$XDG_VAR/ferry`, or `~/HOME_REL/ferry`.
pub(crate) fn default_dir(system: &str, xdg_var: &str, home_rel: &str) -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from(system);
    }
    if let Some(xdg) = std::env::var_os(xdg_var).filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("ferry");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(home_rel).join("ferry")
}

/// The bandwidth timetable a round of `job` follows on the source: the job's, else its peer's, else
/// none.
pub fn job_bwlimit(config: &Config, job: &JobConfig) -> anyhow::Result<Option<ferry_engine::Timetable>> {
    let (text, whose) = match (&job.bwlimit, config.peer(&job.peer).and_then(|p| p.bwlimit.as_ref())) {
        (Some(text), _) => (text, format!("job {}", job.name)),
        (None, Some(text)) => (text, format!("peer {}", job.peer)),
        (None, None) => return Ok(None),
    };
    Ok(Some(ferry_engine::Timetable::parse(text).with_context(|| format!("the bwlimit of {whose} in ferry.toml"))?))
}

/// Splits an export command into words and replaces `{source}` and `{job}`.
pub fn export_argv(command: &str, source: &Path, job: &str) -> anyhow::Result<Vec<String>> {
    let words = import_argv(command, source, job, 0)?;
    Ok(words.into_iter().map(|w| w.replace("{source}", &source.display().to_string())).collect())
}

/// Splits an import command into words and replaces `{target}`, `{job}` and `{round}`.
pub fn import_argv(command: &str, target: &Path, job: &str, round: u64) -> anyhow::Result<Vec<String>> {
    let words = shlex::split(command).ok_or_else(|| {
        anyhow::anyhow!("cannot split the import command {command:?} into words (unbalanced quotes?)")
    })?;
    if words.is_empty() {
        bail!("the import command is empty");
    }
    Ok(words
        .into_iter()
        .map(|w| {
            w.replace("{target}", &target.display().to_string())
                .replace("{job}", job)
                .replace("{round}", &round.to_string())
        })
        .collect())
}

/// A job's name must be usable as a folder name.
pub fn check_job_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        bail!("job name {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_unknown_keys() {
        let id: NodeId = ferry_certs::Identity::generate().unwrap().node_id();
        let config = Config {
            listen: Some("[::]:7373".into()),
            data_dir: None,
            metrics_file: Some("/var/lib/node_exporter/textfile/ferry.prom".into()),
            peers: vec![PeerConfig {
                name: "dest".into(),
                id,
                addr: Some("10.0.0.2:7373".into()),
                bwlimit: Some("Mon-Fri 08:00,512K 19:00,20M".into()),
                receive_bwlimit: None,
            }],
            jobs: vec![JobConfig {
                name: "zimbra".into(),
                path: "/opt/zimbra/backup/ng".into(),
                peer: "dest".into(),
                import_cmd: Some("zxsuite backup doExternalRestore {target}".into()),
                import_provisioning_cmd: None,
                import_timeout: Some("12h".into()),
                import_user: Some("zimbra".into()),
                export_cmd: None,
                export_user: None,
                bwlimit: None,
            }],
        };
        let text = toml::to_string_pretty(&config).unwrap();
        assert!(text.contains("[[peer]]") && text.contains("[[job]]"), "{text}");
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), config);
        let err = toml::from_str::<Config>("lisen = \"x\"").unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(check_job_name("zimbra-1").is_ok());
        let argv =
            import_argv("zxsuite backup doExternalRestore '{target}' --round={round}", Path::new("/srv/m ng"), "z", 7)
                .unwrap();
        assert_eq!(argv, ["zxsuite", "backup", "doExternalRestore", "/srv/m ng", "--round=7"]);
        assert!(import_argv("echo 'unbalanced", Path::new("/"), "z", 1).is_err());
        assert!(check_job_name("../x").is_err());
        // The job's limit wins over its peer's; a bad one names whose it is.
        assert_eq!(
            job_bwlimit(&config, &config.jobs[0]).unwrap(),
            Some(ferry_engine::Timetable::parse("Mon-Fri 08:00,512K 19:00,20M").unwrap())
        );
        let mut job = config.jobs[0].clone();
        job.bwlimit = Some("2M".into());
        assert_eq!(job_bwlimit(&config, &job).unwrap(), Some(ferry_engine::Timetable::parse("2M").unwrap()));
        job.bwlimit = Some("08:00,fast".into());
        let err = format!("{:#}", job_bwlimit(&config, &job).unwrap_err());
        assert!(err.contains("job zimbra") && err.contains("fast"), "{err}");
        let argv = export_argv("zxsuite backup doSmartScan --dir {source}", Path::new("/opt/b"), "z").unwrap();
        assert_eq!(argv, ["zxsuite", "backup", "doSmartScan", "--dir", "/opt/b"]);
    }
}
