//! SIGTERM and SIGINT stop a round cleanly, as its deadline would: the batches on the wire finish,
//! the destination keeps what arrived, and the round is recorded as stopped. A second signal stops
//! the process at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Whether the operator asked the round to stop, and with which signal.
#[derive(Clone)]
pub(super) struct StopRequest(watch::Receiver<Option<&'static str>>);

impl StopRequest {
    /// Listens for SIGTERM and SIGINT from now on (in place of their default, which kills at once).
    pub(super) fn listen() -> Self {
        let (tx, rx) = watch::channel(None);
        let (Ok(mut term), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            tracing::warn!("cannot listen for SIGTERM and SIGINT: they stop the round at once");
            return Self(rx);
        };
        crate::helpers::spawn_in_span(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            tracing::warn!(
                "{name}: stopping the round cleanly (what arrived is kept); send the signal again to stop at once"
            );
            let _ = tx.send(Some(name));
            tokio::select! {
                _ = term.recv() => {},
                _ = interrupt.recv() => {},
            }
            eprintln!("ferry: stopped at once by a second signal; the files that arrived whole are kept");
            std::process::exit(crate::exit::STOPPED);
        });
        Self(rx)
    }

    /// The signal that asked for the stop, if one did.
    pub(super) fn signal(&self) -> Option<&'static str> {
        *self.0.borrow()
    }

    /// Waits until a stop is asked for (at once if it was already); returns the signal's name.
    pub(super) async fn requested(&mut self) -> &'static str {
        loop {
            if let Some(name) = *self.0.borrow_and_update() {
                return name;
            }
            if self.0.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}
