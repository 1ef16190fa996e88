//! What the operator lets a round replace although ferry did not put it there: `--adopt` on a local
//! round, `ferry job adopt` on a network round's destination (kept in the job's state until a round
//! that applies it commits).

use anyhow::{Context, bail};
use ferry_engine::{Adopt, RelPath};

use crate::config_dir::ConfigDir;
use crate::state::TargetState;

/// Paths relative to the target, or `all`, as the apply takes them.
pub(crate) fn parse(given: &[String]) -> anyhow::Result<Adopt> {
    if given.is_empty() {
        return Ok(Adopt::Nothing);
    }
    if given.iter().any(|p| p == "all") {
        return Ok(Adopt::All);
    }
    let paths = given
        .iter()
        .map(|p| {
            RelPath::new(trimmed(p).as_bytes().to_vec())
                .map_err(|e| anyhow::anyhow!("--adopt {p}: {e} (give a path relative to the target, or all)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Adopt::Paths(paths))
}

fn trimmed(path: &str) -> &str {
    path.trim_start_matches("./").trim_end_matches('/')
}

/// The adoption a destination's operator asked for, as a round read it.
pub(crate) struct Pending {
    /// The paths as given (empty: none asked for), to tell whether more were asked for before it is
    /// taken.
    given: Vec<String>,
    pub(crate) adopt: Adopt,
}

impl Pending {
    pub(crate) fn read(state: &TargetState) -> anyhow::Result<Self> {
        let given = asked_for(state)?;
        Ok(Self { adopt: parse(&given)?, given })
    }

    /// The round that applied it committed: it is done with, unless the operator asked for more
    /// meanwhile (then it stays, for the next round).
    pub(crate) fn taken(self, state: &TargetState) {
        if !self.given.is_empty()
            && asked_for(state).is_ok_and(|now| now == self.given)
            && let Err(e) = std::fs::remove_file(state.adopt())
        {
            tracing::warn!("cannot remove {} (the next round adopts the same again): {e}", state.adopt().display());
        }
    }
}

/// The paths in the job's adoption file, as given (none without the file).
fn asked_for(state: &TargetState) -> anyhow::Result<Vec<String>> {
    let path = state.adopt();
    match std::fs::read(&path) {
        Ok(text) => serde_json::from_slice(&text).with_context(|| format!("{} is damaged", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Why a round of `job` must not fill `target` now: it looks like a disk that is not mounted
/// ([`ferry_engine::FolderIdentity::looks_unmounted`]), and the operator did not ask for it to be
/// filled anew (`ferry job adopt JOB all`).
pub(crate) fn unmounted(state: &TargetState, job: &str, target: &std::path::Path) -> Option<String> {
    let why = ferry_engine::FolderIdentity::read(&state.identity(), target).looks_unmounted()?;
    if Pending::read(state).is_ok_and(|asked| asked.adopt == Adopt::All) {
        return None;
    }
    Some(format!("{why} Nothing was written. To fill it anew, `ferry job adopt {job} all` on this node."))
}

/// What the next round of the job is asked to adopt, as given (`ferry status`): nothing when none
/// was asked for or the file cannot be read.
pub(crate) fn pending_paths(state: &TargetState) -> Vec<String> {
    asked_for(state).unwrap_or_default()
}

/// `ferry job adopt JOB PATH...|all`, on the destination.
pub fn ask(config_dir: &ConfigDir, job: &str, given: &[String]) -> anyhow::Result<()> {
    let config = config_dir.load()?;
    if config.job(job).is_none() {
        bail!("there is no job {job:?} here (ferry job list shows the jobs)");
    }
    let adopt = parse(given)?;
    let state = TargetState::new(&config_dir.data_dir(&config), job);
    if state.holds()?.is_none() {
        bail!(
            "no round of job {job} has been committed here yet: its first round adopts whatever is at the \
             source's paths anyway"
        );
    }
    let mut paths = asked_for(&state)?;
    if adopt == Adopt::All {
        paths = vec!["all".to_owned()];
    } else if !paths.iter().any(|p| p == "all") {
        for path in given.iter().map(|p| trimmed(p).to_owned()) {
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
    }
    crate::helpers::write_durably(&state.adopt(), &serde_json::to_vec(&paths)?)
        .with_context(|| format!("cannot write {}", state.adopt().display()))?;
    if paths == ["all"] {
        println!(
            "the next round of job {job} replaces whatever is at a path the source has, ferry's or not (what is \
             at paths the source does not have stays)"
        );
    } else {
        println!(
            "the next round of job {job} replaces what is at {} (and beneath) with the source's, ferry's or not",
            paths.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_taken_relative_to_the_target_and_all_is_everything() {
        let rel = |p: &str| RelPath::new(p.as_bytes().to_vec()).unwrap();
        assert_eq!(parse(&[]).unwrap(), Adopt::Nothing);
        assert_eq!(parse(&["./a/b/".into(), "c".into()]).unwrap(), Adopt::Paths(vec![rel("a/b"), rel("c")]));
        assert_eq!(parse(&["a".into(), "all".into()]).unwrap(), Adopt::All);
        for bad in ["/etc/passwd", "../up", "a/../../b"] {
            assert!(parse(&[bad.into()]).is_err(), "{bad} taken");
        }
    }

    /// What the operator adds while a round runs stays for the next round.
    #[test]
    fn an_adoption_asked_for_during_a_round_outlives_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = TargetState { dir: dir.path().to_owned() };
        std::fs::write(state.adopt(), br#"["a"]"#).unwrap();
        let read = Pending::read(&state).unwrap();
        assert_eq!(read.adopt, Adopt::Paths(vec![RelPath::new(&b"a"[..]).unwrap()]));
        std::fs::write(state.adopt(), br#"["a","b"]"#).unwrap();
        read.taken(&state);
        assert!(state.adopt().exists());
        Pending::read(&state).unwrap().taken(&state);
        assert!(!state.adopt().exists());
        assert_eq!(Pending::read(&state).unwrap().adopt, Adopt::Nothing);
    }
}
