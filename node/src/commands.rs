//! `ferry init`, `ferry trust`, `ferry job`: the setup commands.

use anyhow::{Context, bail};
use ferry_certs::{Identity, NodeId};

use crate::config::{Config, ConfigDir, JobConfig, PeerConfig, check_job_name};

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
pub fn trust(config_dir: &ConfigDir, id: &str, name: &str, addr: Option<String>) -> anyhow::Result<()> {
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
        None => config.peers.push(PeerConfig { name: name.to_owned(), id, addr }),
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

/// `ferry job add`.
pub fn job_add(config_dir: &ConfigDir, name: &str, path: &std::path::Path, peer: &str) -> anyhow::Result<()> {
    check_job_name(name)?;
    let mut config = config_dir.load()?;
    if config.peer(peer).is_none() {
        bail!("no peer called {peer:?}: pin it first with `ferry trust NODE_ID --name {peer}`");
    }
    let path = std::path::absolute(path).with_context(|| format!("bad path {}", path.display()))?;
    config.jobs.retain(|j| j.name != name);
    config.jobs.push(JobConfig { name: name.to_owned(), path: path.clone(), peer: peer.to_owned() });
    config_dir.save(&config)?;
    println!("job {name}: {} with peer {peer}", path.display());
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
