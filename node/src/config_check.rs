//! `ferry config check` and `ferry config reference`: what each key of `ferry.toml` means, and the
//! checks that point at the line of a bad one.
//!
//! [`KEYS`] is the reference; a test compares it with the keys serde accepts, so a key added to
//! [`Config`] without a line here fails the build's tests, and `CONFIG.md` is this table printed.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use crate::config::{Config, JobConfig, check_job_name, import_argv};

/// Which table a key lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The top of the file.
    Top,
    /// A `[[peer]]` table.
    Peer,
    /// A `[[job]]` table.
    Job,
}

impl Section {
    /// How the table is written in the file.
    pub fn header(self) -> &'static str {
        match self {
            Self::Top => "top level",
            Self::Peer => "[[peer]]",
            Self::Job => "[[job]]",
        }
    }

    fn array_key(self) -> Option<&'static str> {
        match self {
            Self::Top => None,
            Self::Peer => Some("peer"),
            Self::Job => Some("job"),
        }
    }
}

/// One key of `ferry.toml`.
#[derive(Debug)]
pub struct Key {
    /// Its table.
    pub section: Section,
    /// Its name.
    pub name: &'static str,
    /// What applies when it is absent (`required` when it must be there).
    pub default: &'static str,
    /// Which node reads it: `both`, `source` or `destination`.
    pub node: &'static str,
    /// What it means.
    pub meaning: &'static str,
    /// The command that sets it, if any.
    pub set_by: &'static str,
}

/// Every key of `ferry.toml`.
pub const KEYS: &[Key] = &[
    Key {
        section: Section::Top,
        name: "listen",
        default: "`[::]:7373`",
        node: "destination",
        meaning: "The address and UDP port `ferry serve` listens on (`HOST:PORT`); `serve --listen` wins.",
        set_by: "",
    },
    Key {
        section: Section::Top,
        name: "data_dir",
        default: "`/var/lib/ferry` when the config folder is `/etc/ferry`, else `data/` in the config folder",
        node: "both",
        meaning: "Where round state lives (chunk index, manifests, history, import logs); an absolute path. \
                  `--data-dir` / `FERRY_DATA_DIR` win.",
        set_by: "",
    },
    Key {
        section: Section::Top,
        name: "metrics_file",
        default: "none",
        node: "both",
        meaning: "A file of Prometheus text that the node rewrites (atomically) after every round: each job's \
                  last round on each side, whether it went through and left the trees identical, its bytes, \
                  duration and import (for node_exporter's textfile collector; an example alert is below). An \
                  absolute path in an existing folder.",
        set_by: "",
    },
    Key {
        section: Section::Peer,
        name: "name",
        default: "required",
        node: "both",
        meaning: "The name jobs use for this peer; unique in the file.",
        set_by: "`ferry trust ID --name NAME`",
    },
    Key {
        section: Section::Peer,
        name: "id",
        default: "required",
        node: "both",
        meaning: "The peer's node ID as its `ferry init` printed it (32 base32 characters). Only pinned IDs get \
                  past the TLS handshake.",
        set_by: "`ferry trust ID`",
    },
    Key {
        section: Section::Peer,
        name: "addr",
        default: "none",
        node: "source",
        meaning: "Where to reach the peer, `HOST:PORT` (a name or an address; IPv6 as `[::1]:7373`). Needed \
                  for peers this node sends to.",
        set_by: "`ferry trust ... --addr HOST:PORT`",
    },
    Key {
        section: Section::Peer,
        name: "bwlimit",
        default: "none (unlimited)",
        node: "source",
        meaning: "Bandwidth limit or timetable for rounds sent to this peer, as `sync --bwlimit` (`20M`, \
                  `\"Mon-Fri 08:00,512K 19:00,20M 23:00,off\"`). A job's own `bwlimit` and the command line win. \
                  Re-read on SIGHUP during a round.",
        set_by: "`ferry trust ... --bwlimit RATE`",
    },
    Key {
        section: Section::Peer,
        name: "receive_bwlimit",
        default: "none (unlimited)",
        node: "destination",
        meaning: "The most this peer may send here, a rate or a timetable like `bwlimit`; read at the start \
                  of each round.",
        set_by: "`ferry trust ... --receive-bwlimit RATE`",
    },
    Key {
        section: Section::Job,
        name: "name",
        default: "required",
        node: "both",
        meaning: "The job's name, the same on both nodes: 1-64 letters, digits, `-`, `_` or `.`, not starting \
                  with `.`; unique in the file.",
        set_by: "`ferry job add NAME`",
    },
    Key {
        section: Section::Job,
        name: "path",
        default: "required",
        node: "both",
        meaning: "Source: the folder to send. Destination: the target folder (created if missing). An \
                  absolute path.",
        set_by: "`ferry job add/set --path DIR`",
    },
    Key {
        section: Section::Job,
        name: "peer",
        default: "required",
        node: "both",
        meaning: "The `name` of a `[[peer]]` in this file: the destination it is sent to, or the one source \
                  allowed to write it.",
        set_by: "`ferry job add/set --peer NAME`",
    },
    Key {
        section: Section::Job,
        name: "import_cmd",
        default: "none (no import)",
        node: "destination",
        meaning: "Run after each committed round, e.g. `/opt/zimbra/bin/zxsuite backup doExternalRestore \
                  {target}`. Split into words like a shell would, never run through one; `{target}`, `{job}` \
                  and `{round}` are replaced.",
        set_by: "`ferry job set --import-cmd CMD`",
    },
    Key {
        section: Section::Job,
        name: "import_provisioning_cmd",
        default: "none",
        node: "destination",
        meaning: "The provisioning-only import, run for `sync --import provisioning-only`; split and replaced \
                  like `import_cmd`.",
        set_by: "`ferry job set --import-provisioning-cmd CMD`",
    },
    Key {
        section: Section::Job,
        name: "import_timeout",
        default: "`24h`",
        node: "destination",
        meaning: "How long an import may run before it is killed (`12h`, `90m`).",
        set_by: "`ferry job set --import-timeout DURATION`",
    },
    Key {
        section: Section::Job,
        name: "import_user",
        default: "the daemon's user",
        node: "destination",
        meaning: "The user the import runs as (its uid, gid and home), e.g. `zimbra`; the daemon must run as \
                  root to switch.",
        set_by: "`ferry job set --import-user USER`",
    },
    Key {
        section: Section::Job,
        name: "export_cmd",
        default: "none",
        node: "source",
        meaning: "Run before each round's scan, e.g. `/opt/zimbra/bin/zxsuite backup doSmartScan`; no round \
                  starts if it fails. Split like `import_cmd`; `{source}` and `{job}` are replaced.",
        set_by: "`ferry job set --export-cmd CMD`",
    },
    Key {
        section: Section::Job,
        name: "export_user",
        default: "the user running `sync`",
        node: "source",
        meaning: "The user the export command runs as, e.g. `zimbra` (`zxsuite` must run as the Zimbra user); \
                  `sync` must run as root to switch.",
        set_by: "`ferry job set --export-user USER`",
    },
    Key {
        section: Section::Job,
        name: "bwlimit",
        default: "the peer's `bwlimit`",
        node: "source",
        meaning: "Bandwidth limit or timetable for this job's rounds, as `sync --bwlimit`; wins over the \
                  peer's, and the command line wins over it. Re-read on SIGHUP during a round.",
        set_by: "`ferry job set --bwlimit RATE`",
    },
];

/// The reference, as Markdown (what `CONFIG.md` holds).
pub fn reference() -> String {
    let mut out = String::from(
        "# ferry.toml\n\n\
         <!-- Generated by `ferry config reference > CONFIG.md`; a test fails when it and the code differ. -->\n\n\
         Each node reads `ferry.toml` in its config folder (`--config-dir`, `FERRY_CONFIG_DIR`; by default \
         `/etc/ferry` for root, else `~/.config/ferry`). `ferry init`, `ferry trust`, `ferry untrust` and \
         `ferry job` write it, keeping every comment and the layout of what they do not change; it can also \
         be edited by hand, and `ferry config check` then says whether it is valid, naming the \
         line and the key of each problem. Unknown keys are errors, so a typo never goes unnoticed.\n\n\
         ```toml\n\
         listen = \"[::]:7373\"\n\n\
         [[peer]]\n\
         name = \"dest\"\n\
         id = \"NODE_ID_OF_THE_PEER\"\n\
         addr = \"new-mail.example.com:7373\"\n\
         bwlimit = \"Mon-Fri 07:00,2M 20:00,50M\"\n\n\
         [[job]]\n\
         name = \"zimbra\"\n\
         path = \"/opt/zimbra/backup/ng\"\n\
         peer = \"dest\"\n\
         export_cmd = \"/opt/zimbra/bin/zxsuite backup doSmartScan\"\n\
         ```\n",
    );
    for section in [Section::Top, Section::Peer, Section::Job] {
        out.push_str(&format!("\n## {}\n\n", section.header()));
        out.push_str("| key | default | read on | meaning | set by |\n|---|---|---|---|---|\n");
        for key in KEYS.iter().filter(|k| k.section == section) {
            out.push_str(&format!(
                "| `{}` | {} | {} | {} | {} |\n",
                key.name, key.default, key.node, key.meaning, key.set_by
            ));
        }
    }
    out.push_str(
        "\n## Monitoring with `metrics_file`\n\n\
         Each job's last round on each side (`side=\"sent\"` on the source, `\"received\"` on the destination) \
         as gauges: `ferry_round_last` (its number), `ferry_round_last_timestamp_seconds`, \
         `ferry_round_last_success` (1: committed; 0: failed, refused or stopped), `ferry_round_last_in_sync`, \
         `ferry_round_last_bytes` and `ferry_round_last_duration_seconds` (of the last committed round), \
         `ferry_round_last_in_sync_timestamp_seconds`, and on the destination `ferry_import_last_success` and \
         `ferry_import_last_timestamp_seconds`. With node_exporter's textfile collector \
         (`--collector.textfile.directory=/var/lib/node_exporter/textfile`, `metrics_file = \
         \"/var/lib/node_exporter/textfile/ferry.prom\"`), an alert for a migration whose nightly round \
         has not left the trees identical for a day and a half:\n\n\
         ```yaml\n\
         groups:\n\
         - name: ferry\n\
         \x20 rules:\n\
         \x20 - alert: FerryRoundsNotInSync\n\
         \x20   expr: time() - ferry_round_last_in_sync_timestamp_seconds{side=\"sent\"} > 36 * 3600\n\
         \x20   labels: {severity: page}\n\
         \x20   annotations:\n\
         \x20     summary: 'ferry job {{ $labels.job }}: no round in sync for 36 h (ferry status, ferry log)'\n\
         \x20 - alert: FerryImportFailed\n\
         \x20   expr: ferry_import_last_success == 0\n\
         \x20   annotations:\n\
         \x20     summary: 'ferry job {{ $labels.job }}: the last import failed (ferry status on the destination)'\n\
         ```\n",
    );
    out
}

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The file cannot be used.
    Error,
    /// It can, but probably not as meant.
    Warning,
}

/// One problem in a config file, with where it is. Shown as `LINE:COLUMN: error: KEY: MESSAGE`, to
/// follow the file's path as compilers do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// How bad.
    pub severity: Severity,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
    /// Which key: `listen`, `job "zimbra" bwlimit`, `peer #2 addr`...
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}:{}: {severity}: {}: {}", self.line, self.column, self.key, self.message)
    }
}

/// Parses and checks a config: the config, or every problem found. Warnings come with an `Ok`.
pub fn check(text: &str) -> Result<(Config, Vec<Problem>), Vec<Problem>> {
    let config: Config = match toml::from_str(text) {
        Ok(config) => config,
        Err(e) => {
            let (line, column) = e.span().map_or((0, 0), |span| line_column(text, span.start));
            let key = e.span().map(|span| key_at(text, span.start)).unwrap_or_default();
            return Err(vec![Problem {
                severity: Severity::Error,
                line,
                column,
                key,
                message: e.message().trim().to_owned(),
            }]);
        }
    };
    let found = semantic_problems(&config);
    // Lines are looked up only when there is something to point at.
    let tree = if found.is_empty() { None } else { DeTable::parse(text).ok() };
    let problems: Vec<Problem> = found
        .into_iter()
        .map(|(place, severity, message)| {
            let span = tree.as_ref().and_then(|tree| place.span(tree.get_ref()));
            let (line, column) = span.map_or((0, 0), |start| line_column(text, start));
            Problem { severity, line, column, key: place.to_string(), message }
        })
        .collect();
    if problems.iter().any(|p| p.severity == Severity::Error) { Err(problems) } else { Ok((config, problems)) }
}

/// A key in the parsed config.
struct Place {
    section: Section,
    index: usize,
    /// The table's `name`, for messages.
    name: String,
    key: &'static str,
}

impl Place {
    fn top(key: &'static str) -> Self {
        Self { section: Section::Top, index: 0, name: String::new(), key }
    }

    /// Where the key starts in the text (its table's header when the key is missing).
    fn span(&self, tree: &DeTable<'_>) -> Option<usize> {
        let table = match self.section.array_key() {
            None => tree,
            Some(array) => {
                let (_, value) = tree.iter().find(|(k, _)| k.get_ref() == array)?;
                let DeValue::Array(items) = value.get_ref() else { return None };
                let item = items.get(self.index)?;
                match item.get_ref() {
                    DeValue::Table(table) => {
                        let key = table.iter().find(|(k, _)| k.get_ref() == self.key);
                        return Some(key.map_or(item.span().start, |(k, _)| k.span().start));
                    }
                    _ => return Some(item.span().start),
                }
            }
        };
        table.iter().find(|(k, _)| k.get_ref() == self.key).map(|(k, _)| k.span().start)
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.section.array_key() {
            None => write!(f, "{}", self.key),
            Some(array) if self.name.is_empty() => write!(f, "{array} #{} {}", self.index + 1, self.key),
            Some(array) => write!(f, "{array} {:?} {}", self.name, self.key),
        }
    }
}

fn semantic_problems(config: &Config) -> Vec<(Place, Severity, String)> {
    let mut problems = Vec::new();
    let mut error = |place: Place, message: String| problems.push((place, Severity::Error, message));
    if let Some(listen) = &config.listen
        && let Err(why) = check_host_port(listen)
    {
        error(Place::top("listen"), why);
    }
    if let Some(dir) = &config.data_dir
        && !dir.is_absolute()
    {
        error(Place::top("data_dir"), format!("{} is not an absolute path", dir.display()));
    }
    if let Some(file) = &config.metrics_file {
        if !file.is_absolute() {
            error(Place::top("metrics_file"), format!("{} is not an absolute path", file.display()));
        } else if file.parent().is_some_and(|dir| !dir.is_dir()) {
            error(Place::top("metrics_file"), format!("the folder of {} does not exist", file.display()));
        }
    }
    let mut names = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for (index, peer) in config.peers.iter().enumerate() {
        let place = |key| Place { section: Section::Peer, index, name: peer.name.clone(), key };
        if peer.name.is_empty() {
            error(place("name"), "a peer needs a name".into());
        } else if !names.insert(peer.name.as_str()) {
            error(place("name"), "another [[peer]] has this name; names must be unique".into());
        }
        if !ids.insert(peer.id) {
            error(place("id"), "another [[peer]] has this node ID; one node, one name".into());
        }
        if let Some(addr) = &peer.addr
            && let Err(why) = check_host_port(addr)
        {
            error(place("addr"), why);
        }
        for (key, value) in [("bwlimit", &peer.bwlimit), ("receive_bwlimit", &peer.receive_bwlimit)] {
            if let Some(value) = value
                && let Err(e) = ferry_engine::Timetable::parse(value)
            {
                error(place(key), e.to_string());
            }
        }
    }
    let mut jobs = std::collections::HashSet::new();
    let mut warnings = Vec::new();
    for (index, job) in config.jobs.iter().enumerate() {
        let place = |key| Place { section: Section::Job, index, name: job.name.clone(), key };
        if let Err(e) = check_job_name(&job.name) {
            error(place("name"), e.to_string());
        } else if !jobs.insert(job.name.as_str()) {
            error(place("name"), "another [[job]] has this name; names must be unique".into());
        }
        if !job.path.is_absolute() {
            error(place("path"), format!("{} is not an absolute path", job.path.display()));
        }
        if config.peer(&job.peer).is_none() {
            error(
                place("peer"),
                format!("no [[peer]] is called {:?}: pin it with `ferry trust NODE_ID --name {}`", job.peer, job.peer),
            );
        }
        for (key, command) in [
            ("import_cmd", &job.import_cmd),
            ("import_provisioning_cmd", &job.import_provisioning_cmd),
            ("export_cmd", &job.export_cmd),
        ] {
            if let Some(command) = command
                && let Err(e) = import_argv(command, Path::new("/target"), &job.name, 1)
            {
                error(place(key), e.to_string());
            }
        }
        if let Some(timeout) = &job.import_timeout
            && let Err(e) = humantime::parse_duration(timeout)
        {
            error(place("import_timeout"), format!("{e} (write e.g. 12h or 90m)"));
        }
        if let Some(limit) = &job.bwlimit
            && let Err(e) = ferry_engine::Timetable::parse(limit)
        {
            error(place("bwlimit"), e.to_string());
        }
        for (key, user, hook) in
            [("import_user", &job.import_user, "import"), ("export_user", &job.export_user, "export")]
        {
            if let Some(user) = user
                && uzers::get_user_by_name(user).is_none()
            {
                warnings.push((
                    place(key),
                    Severity::Warning,
                    format!("no user {user:?} on this machine: the {hook} cannot run here"),
                ));
            }
        }
    }
    // Two destinations' jobs in one folder, or one inside the other, overwrite each other's files and
    // each then reports its own round as matching. (A source may send one folder in several jobs: a
    // destination's jobs are those whose peer has no address, since it never connects out.)
    let targets: Vec<(usize, &JobConfig, PathBuf)> = config
        .jobs
        .iter()
        .enumerate()
        .filter(|(_, job)| config.peer(&job.peer).is_some_and(|peer| peer.addr.is_none()))
        .map(|(index, job)| (index, job, job.path.canonicalize().unwrap_or_else(|_| job.path.clone())))
        .collect();
    for (i, (index, job, path)) in targets.iter().enumerate() {
        if let Some((_, other, _)) = targets[..i].iter().find(|(_, _, p)| p.starts_with(path) || path.starts_with(p)) {
            problems.push((
                Place { section: Section::Job, index: *index, name: job.name.clone(), key: "path" },
                Severity::Error,
                format!(
                    "{} overlaps the folder of job {:?} ({}): two jobs would write the same files",
                    job.path.display(),
                    other.name,
                    other.path.display()
                ),
            ));
        }
    }
    problems.extend(warnings);
    problems
}

/// `HOST:PORT`, with a port number.
fn check_host_port(text: &str) -> Result<(), String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} has no port: write HOST:PORT, e.g. new-mail.example.com:7373"));
    };
    if host.is_empty() {
        return Err(format!("{text:?} has no host: write HOST:PORT, e.g. [::]:7373"));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!("{port:?} is not a port number (1-65535)"));
    }
    Ok(())
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The key written at the start of the line holding `offset`, for a parse error's message.
fn key_at(text: &str, offset: usize) -> String {
    let start = text[..offset.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) => key.trim().to_owned(),
        None => line.trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn config(text: &str) -> String {
        text.replace("ID", ID)
    }

    #[test]
    fn a_good_file_passes() {
        let text = config(
            "listen = \"[::]:7373\"\n[[peer]]\nname = \"dest\"\nid = \"ID\"\naddr = \"10.0.0.2:7373\"\n\
             [[job]]\nname = \"zimbra\"\npath = \"/srv/ng\"\npeer = \"dest\"\nbwlimit = \"08:00,512K 23:00,off\"\n",
        );
        let (config, warnings) = check(&text).unwrap();
        assert_eq!(config.jobs.len(), 1);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let text = config("[[peer]]\nname = \"dest\"\nid = \"ID\"\nadress = \"x:1\"\n");
        let problems = check(&text).unwrap_err();
        assert_eq!(problems.len(), 1);
        let problem = &problems[0];
        assert_eq!((problem.line, problem.column), (4, 1), "{problem}");
        assert_eq!(problem.key, "adress");
        assert!(problem.message.contains("unknown field `adress`"), "{problem}");
    }

    #[test]
    fn a_bad_value_is_named_with_its_job_key_and_line() {
        let text = config(
            "[[peer]]\nname = \"dest\"\nid = \"ID\"\n\n[[job]]\nname = \"a\"\npath = \"/a\"\npeer = \"dest\"\n\n\
             [[job]]\nname = \"b\"\npath = \"/b\"\npeer = \"dets\"\n  bwlimit = \"08:00,fast\"\n",
        );
        let problems = check(&text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{shown:#?}");
        assert_eq!((problems[0].line, problems[0].key.as_str()), (13, "job \"b\" peer"), "{shown:#?}");
        assert!(problems[0].message.contains("no [[peer]] is called \"dets\""), "{shown:#?}");
        assert_eq!((problems[1].line, problems[1].column), (14, 3), "{shown:#?}");
        assert_eq!(problems[1].key, "job \"b\" bwlimit");
        assert!(problems[1].message.contains("fast"), "{shown:#?}");
    }

    #[test]
    fn addresses_paths_names_and_durations_are_checked() {
        let text = config(
            "listen = \"7373\"\ndata_dir = \"var/ferry\"\n[[peer]]\nname = \"d\"\nid = \"ID\"\naddr = \"host:99999\"\n\
             [[peer]]\nname = \"d\"\nid = \"ID\"\n[[job]]\nname = \"../x\"\npath = \"rel\"\npeer = \"d\"\n\
             import_timeout = \"soon\"\nimport_cmd = \"echo 'open\"\n",
        );
        let problems = check(&text).unwrap_err();
        let keys: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                (1, "listen"),
                (2, "data_dir"),
                (6, "peer \"d\" addr"),
                (8, "peer \"d\" name"),
                (9, "peer \"d\" id"),
                (11, "job \"../x\" name"),
                (12, "job \"../x\" path"),
                (15, "job \"../x\" import_cmd"),
                (14, "job \"../x\" import_timeout"),
            ]
        );
    }

    #[test]
    fn a_metrics_file_must_be_absolute_and_in_a_folder_that_exists() {
        for (value, words) in [("ferry.prom", "not an absolute path"), ("/no/such/folder/ferry.prom", "does not exist")]
        {
            let problems = check(&config(&format!("metrics_file = \"{value}\"\n"))).unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].key == "metrics_file" && problems[0].message.contains(words), "{problems:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(check(&config(&format!("metrics_file = \"{}/ferry.prom\"\n", dir.path().display()))).is_ok());
    }

    #[test]
    fn an_unknown_import_user_is_a_warning() {
        let text = config(
            "[[peer]]\nname = \"s\"\nid = \"ID\"\n[[job]]\nname = \"j\"\npath = \"/j\"\npeer = \"s\"\n\
             import_user = \"no-such-user-here\"\n",
        );
        let (_, warnings) = check(&text).unwrap();
        assert_eq!(warnings.len(), 1);
        assert_eq!((warnings[0].severity, warnings[0].line), (Severity::Warning, 8));
    }

    /// The keys serde accepts in a table, from its own "expected one of" message.
    fn serde_keys(prefix: &str) -> Vec<String> {
        let text = format!("{prefix}\nno_such_key_anywhere = 1\n");
        let message = toml::from_str::<Config>(&text).unwrap_err().message().to_owned();
        let expected = message.split("expected one of").nth(1).unwrap_or_else(|| panic!("{message}"));
        expected.split('`').skip(1).step_by(2).map(str::to_owned).collect()
    }

    #[test]
    fn the_reference_names_exactly_the_keys_the_code_reads() {
        for (section, prefix) in [(Section::Top, ""), (Section::Peer, "[[peer]]"), (Section::Job, "[[job]]")] {
            let mut code = serde_keys(prefix);
            // The arrays of tables are documented as their sections.
            code.retain(|k| k != "peer" && k != "job" || section != Section::Top);
            code.sort();
            let mut documented: Vec<String> =
                KEYS.iter().filter(|k| k.section == section).map(|k| k.name.to_owned()).collect();
            documented.sort();
            assert_eq!(code, documented, "{}: the keys in the code and in config_check::KEYS differ", section.header());
        }
    }

    #[test]
    fn config_md_is_the_reference() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../CONFIG.md");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text == reference(),
            "CONFIG.md differs from the code's reference: run `cargo run -p ferry -- config reference > CONFIG.md`"
        );
    }

    #[test]
    fn the_reference_example_is_valid() {
        let reference = reference();
        let example = reference.split("```toml\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
        let (config, warnings) = check(&example.replace("NODE_ID_OF_THE_PEER", ID)).unwrap();
        assert_eq!((config.peers.len(), config.jobs.len(), warnings.len()), (1, 1, 0));
    }
}
