//! Small helpers the node's modules share: error text, durable writes, spans for tasks, defaults.

/// The version of the `--json` reports' layout: it changes only when a field changes meaning or goes
/// away (new fields may appear without it).
pub const REPORT_SCHEMA: u32 = 1;

/// An error and its causes on one line, like `{:#}`, but without repeating a cause whose text the
/// message before it already holds (many errors print their source in their own message too).
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Writes `bytes` to `path` durably: into `NAME.tmp` beside it, fsynced, renamed into place, and the
/// folder fsynced. A crash leaves the old file or the new one, never a part of one.
pub(crate) fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::File::open(folder)?.sync_all()
}

/// `tokio::spawn`, in the current tracing span: the task's log lines keep the job and round.
pub(crate) fn spawn_in_span<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracing::Instrument::in_current_span(future))
}

/// No bandwidth limit.
pub fn unlimited() -> ferry_engine::Timetable {
    ferry_engine::Timetable::parse("off").expect("\"off\" is a valid timetable")
}

/// The default folder for ferry's state: `/var/lib/ferry` for root, else `$XDG_DATA_HOME/ferry` or
/// `~/.local/share/ferry`.
pub fn default_data_dir() -> std::path::PathBuf {
    crate::config::default_dir("/var/lib/ferry", "XDG_DATA_HOME", ".local/share")
}
