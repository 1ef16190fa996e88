//! `ferry init`, `ferry trust`, `ferry untrust`, `ferry job`: the setup commands.

use anyhow::{Context, anyhow, bail};
use ferry_certs::{Identity, NodeId};

use crate::cli::{ImportArgs, TrustArgs};
use crate::config::{Config, JobConfig, PeerConfig, check_job_name};
use crate::config_dir::ConfigDir;
use crate::state::{SourceState, TargetState};

/// `ferry init`: prints the node ID alone on the first line.
pub fn init(config_dir: &ConfigDir) -> anyhow::Result<()> {
    let (identity, created) = Identity::load_or_create(config_dir.path())
        .with_context(|| format!("cannot create an identity in {}", config_dir.path().display()))?;
    if !config_dir.config_file().exists() {
        config_dir.save(&Config::default())?;
    }
    println!("{}", identity.node_id());
    if created {
        eprintln!(
            "created this node's identity in {}; give the ID above to the other node's `ferry trust`",
            config_dir.path().display()
        );
    } else {
        eprintln!("this node already has an identity in {} (kept as it is)", config_dir.path().display());
    }
    Ok(())
}

/// `ferry trust`.
pub fn trust(config_dir: &ConfigDir, args: &TrustArgs) -> anyhow::Result<()> {
    let (id, name, addr) = (args.node_id.as_str(), args.name.as_str(), args.addr.clone());
    for rate in [&args.bwlimit, &args.receive_bwlimit].into_iter().flatten() {
        ferry_engine::Timetable::parse(rate)?;
    }
    let id: NodeId = id.parse()?;
    if name.is_empty() {
        bail!("--name must not be empty");
    }
    let mut config = config_dir.load()?;
    let existing =
        config.peers.iter().position(|p| p.id == id).or_else(|| config.peers.iter().position(|p| p.name == name));
    match existing {
        Some(i) => {
            let peer = &mut config.peers[i];
            peer.id = id;
            peer.name = name.to_owned();
            if addr.is_some() {
                peer.addr = addr;
            }
        }
        None => config.peers.push(PeerConfig::new(name, id, addr)),
    }
    if let Some(peer) = config.peers.iter_mut().find(|p| p.id == id) {
        let set = |value: &Option<String>, field: &mut Option<String>| {
            if let Some(value) = value {
                *field = (!value.is_empty()).then(|| value.clone());
            }
        };
        set(&args.bwlimit, &mut peer.bwlimit);
        set(&args.receive_bwlimit, &mut peer.receive_bwlimit);
    }
    // One name, one node.
    let mut seen = std::collections::HashSet::new();
    config.peers.retain(|p| seen.insert(p.name.clone()));
    config_dir.save(&config)?;
    let peer = config.peer(name).context("the peer was just saved")?;
    println!(
        "trusting {} as {}{}",
        peer.id,
        peer.name,
        peer.addr.as_deref().map(|a| format!(" at {a}")).unwrap_or_default()
    );
    Ok(())
}

/// `ferry job add`: adds or replaces a job.
pub fn job_add(
    config_dir: &ConfigDir,
    name: &str,
    path: &std::path::Path,
    peer: &str,
    import: &ImportArgs,
) -> anyhow::Result<()> {
    check_job_name(name)?;
    let mut config = config_dir.load()?;
    if let Some(job) = config.job(name) {
        bail!(
            "there is a job {name:?} already (folder {}, peer {}): change it with `ferry job set {name} ...`",
            job.path.display(),
            job.peer
        );
    }
    config.jobs.push(JobConfig {
        name: name.to_owned(),
        path: path.to_owned(),
        peer: peer.to_owned(),
        ..JobConfig::default()
    });
    update_job(config_dir, config, name, Some(path), Some(peer), import)
}

/// `ferry job set`: changes what is given, keeps the rest.
pub fn job_set(
    config_dir: &ConfigDir,
    name: &str,
    path: Option<&std::path::Path>,
    peer: Option<&str>,
    import: &ImportArgs,
) -> anyhow::Result<()> {
    let config = config_dir.load()?;
    if config.job(name).is_none() {
        bail!("no job {name:?} (ferry job add {name} --path DIR --peer PEER)");
    }
    update_job(config_dir, config, name, path, peer, import)
}

fn update_job(
    config_dir: &ConfigDir,
    mut config: Config,
    name: &str,
    path: Option<&std::path::Path>,
    peer: Option<&str>,
    import: &ImportArgs,
) -> anyhow::Result<()> {
    if let Some(peer) = peer
        && config.peer(peer).is_none()
    {
        bail!("no peer called {peer:?}: pin it first with `ferry trust NODE_ID --name {peer}`");
    }
    if let Some(timeout) = &import.import_timeout {
        humantime::parse_duration(timeout)
            .with_context(|| format!("--import-timeout {timeout:?}: say e.g. 12h or 90m"))?;
    }
    for command in [&import.import_cmd, &import.import_provisioning_cmd, &import.export_cmd].into_iter().flatten() {
        if !command.is_empty() {
            crate::config::import_argv(command, std::path::Path::new("/target"), name, 1)?;
        }
    }
    if let Some(rate) = import.bwlimit.as_deref().filter(|r| !r.is_empty()) {
        ferry_engine::Timetable::parse(rate).context("--bwlimit")?;
    }
    for (flag, user) in [("--import-user", &import.import_user), ("--export-user", &import.export_user)] {
        if let Some(user) = user.as_deref().filter(|u| !u.is_empty())
            && uzers::get_user_by_name(user).is_none()
        {
            bail!("{flag} {user}: no such user on this machine");
        }
    }
    let job = config.jobs.iter_mut().find(|j| j.name == name).context("the job was just checked")?;
    if let Some(path) = path {
        job.path = std::path::absolute(path).with_context(|| format!("bad path {}", path.display()))?;
    }
    if let Some(peer) = peer {
        job.peer = peer.to_owned();
    }
    let set = |value: &Option<String>, field: &mut Option<String>| {
        if let Some(value) = value {
            *field = (!value.is_empty()).then(|| value.clone());
        }
    };
    set(&import.import_cmd, &mut job.import_cmd);
    set(&import.import_provisioning_cmd, &mut job.import_provisioning_cmd);
    set(&import.import_timeout, &mut job.import_timeout);
    set(&import.import_user, &mut job.import_user);
    set(&import.export_cmd, &mut job.export_cmd);
    set(&import.export_user, &mut job.export_user);
    set(&import.bwlimit, &mut job.bwlimit);
    let shown = format!(
        "job {}: {} with peer {}{}",
        job.name,
        job.path.display(),
        job.peer,
        job.import_cmd.as_deref().map(|c| format!(", import: {c}")).unwrap_or_default()
    );
    config_dir.save(&config)?;
    println!("{shown}");
    Ok(())
}

/// `ferry job remove NAME [--purge]`: takes the job out of `ferry.toml`, refused while a round of it
/// (or its import) runs on this node. Its state stays unless `purge`.
pub fn job_remove(config_dir: &ConfigDir, name: &str, purge: bool) -> anyhow::Result<()> {
    let mut config = config_dir.load()?;
    let Some(index) = config.jobs.iter().position(|job| job.name == name) else {
        bail!("there is no job {name:?} here (ferry job list shows the jobs)");
    };
    let data_dir = config_dir.data_dir(&config);
    let job_dir = crate::state::job_dir(&data_dir, name);
    // A round holds its side's state lock from its start to the end of its import.
    let sides = [SourceState::new(&data_dir, name).dir, TargetState::new(&data_dir, name).dir];
    let _locks = sides
        .iter()
        .filter(|dir| dir.exists())
        .map(|dir| {
            ferry_engine::lock_state(dir).map_err(|e| match e {
                ferry_engine::RoundError::Busy(_) => anyhow!(
                    "a round of job {name} is running on this node (or its import): the job stays; remove it once the round is over (ferry status shows it)"
                ),
                other => anyhow::Error::from(other),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    config.jobs.remove(index);
    config_dir.save(&config)?;
    if purge && job_dir.exists() {
        std::fs::remove_dir_all(&job_dir).with_context(|| format!("cannot remove {}", job_dir.display()))?;
        println!("removed job {name} and its state ({})", job_dir.display());
    } else if job_dir.exists() {
        println!(
            "removed job {name}; its state stays in {} (a job added again under this name goes on from it; `ferry job remove {name} --purge` would have removed it)",
            job_dir.display()
        );
    } else {
        println!("removed job {name}");
    }
    Ok(())
}

/// `ferry untrust NAME|ID`: unpins a peer. Refused while jobs name it (they go first, with their
/// rounds). A running daemon refuses the peer from its next connection on.
pub fn untrust(config_dir: &ConfigDir, who: &str) -> anyhow::Result<()> {
    let mut config = config_dir.load()?;
    let Some(index) = config.peers.iter().position(|peer| peer.name == who || peer.id.to_string() == who) else {
        bail!("no peer named or with the ID {who:?} is trusted here (ferry status lists the peers)");
    };
    let peer = config.peers[index].clone();
    let jobs: Vec<&str> = config.jobs.iter().filter(|job| job.peer == peer.name).map(|job| job.name.as_str()).collect();
    if !jobs.is_empty() {
        bail!(
            "peer {} is still the peer of job {}: remove that first (ferry job remove NAME), then untrust it",
            peer.name,
            jobs.join(", job ")
        );
    }
    config.peers.remove(index);
    config_dir.save(&config)?;
    println!("no longer trusting {} ({}): its next connection is refused", peer.name, peer.id);
    Ok(())
}

/// `ferry job list`.
pub fn job_list(config_dir: &ConfigDir) -> anyhow::Result<()> {
    let config = config_dir.load()?;
    if config.jobs.is_empty() {
        println!("no jobs (ferry job add NAME --path DIR --peer PEER)");
    }
    for job in &config.jobs {
        println!("{}\t{}\t{}", job.name, job.peer, job.path.display());
    }
    Ok(())
}

/// `ferry config check`: prints each problem as `FILE:LINE:COLUMN: error: KEY: MESSAGE`; fails if one
/// is an error.
pub fn config_check(config_dir: &ConfigDir, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let path = file.map_or_else(|| config_dir.config_file(), std::path::Path::to_path_buf);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    match crate::config_check::check(&text) {
        Ok((config, warnings)) => {
            for warning in &warnings {
                eprintln!("{}:{warning}", path.display());
            }
            let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            println!(
                "{} is valid: {}, {}{}",
                path.display(),
                plural(config.peers.len(), "peer"),
                plural(config.jobs.len(), "job"),
                if warnings.is_empty() { String::new() } else { format!(", {}", plural(warnings.len(), "warning")) }
            );
            Ok(())
        }
        Err(problems) => Err(crate::config_dir::invalid(&path, &problems)),
    }
}

/// `ferry man DIR`: one page for `ferry` and one for each subcommand.
pub fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let command = crate::cli::Cli::command();
    clap_mangen::generate_to(command, dir).with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    // The sections clap does not make, on the pages of the command and of `sync`.
    for page in ["ferry.1", "ferry-sync.1"] {
        let path = dir.join(page);
        let mut text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        text.push_str(&man_sections());
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("man pages written to {}", dir.display());
    Ok(())
}

/// EXIT STATUS (from the table README's exit codes and their test share), FILES and ENVIRONMENT, in
/// roff.
fn man_sections() -> String {
    let item = |tag: &str, text: &str| format!(".TP\n\\fB{}\\fR\n{}\n", roff(tag), roff(&text.replace('`', "")));
    let mut page = String::from(".SH \"EXIT STATUS\"\n");
    for (_, code) in crate::exit::ALL {
        page.push_str(&item(&code.to_string(), crate::exit::meaning(code)));
    }
    page.push_str(".SH FILES\n");
    for (path, what) in [
        (
            "/etc/ferry/ferry.toml",
            "peers and jobs (as root; else ~/.config/ferry/ferry.toml): see ferry config reference",
        ),
        (
            "/etc/ferry/identity.key, identity.crt",
            "this node's key pair, made by ferry init (the node ID is a hash of its public key)",
        ),
        (
            "/var/lib/ferry/jobs/JOB/source, target",
            "each job's state on either side: manifests, chunk index, history.jsonl, import.log",
        ),
    ] {
        page.push_str(&item(path, what));
    }
    page.push_str(".SH ENVIRONMENT\n");
    for (name, what) in [
        ("FERRY_CONFIG_DIR", "the config folder, as --config-dir"),
        ("FERRY_DATA_DIR", "where state lives, as --data-dir"),
        ("FERRY_STATE_DIR", "a local round's state folder, as sync --state-dir"),
        ("RUST_LOG", "the log filter (e.g. ferry=debug), over -v"),
        ("FERRY_LOG_FORMAT", "text or json, as --log-format"),
        (
            "FERRY_NO_TMPFILE",
            "when set, files under 8 MiB are built under a name in .ferry-staging instead of O_TMPFILE (for filesystems without it)",
        ),
    ] {
        page.push_str(&item(name, what));
    }
    page
}

/// Text made safe for roff: backslashes and hyphens escaped, no line starting with a control character.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') { format!("\\&{escaped}") } else { escaped }
}

/// `ferry completions SHELL`.
pub fn print_completions(shell: clap_complete::Shell) {
    use clap::CommandFactory;
    let mut command = crate::cli::Cli::command();
    clap_complete::generate(shell, &mut command, "ferry", &mut std::io::stdout());
}
