//! The connection to the job's peer: connecting, asking first, and what its closing means.

use std::time::Duration;

use anyhow::anyhow;
use ferry_certs::Identity;
use ferry_proto::{Message, Refusal};

use super::options::PushOptions;
use super::outcome::Unreachable;
use crate::net::{self, FrameReader};
use crate::refused::Refused;

/// Opens a connection to the job's peer; failures are [`Unreachable`] or, when trust is what failed,
/// [`Refused`].
pub(super) async fn connect(
    client: &net::Client,
    peer: &crate::config::PeerConfig,
    addr: &str,
    identity: &Identity,
    options: &PushOptions,
) -> anyhow::Result<quinn::Connection> {
    let remote = net::resolve(addr)?;
    tracing::info!("connecting to {} ({}) at {remote}", peer.name, peer.id);
    match client.connect(identity, peer.id, remote, options.congestion).await {
        Ok(connection) => Ok(connection),
        Err(e) => {
            // Refused once connected (the peer speaks another protocol version): it says so itself.
            if let Some(refused) = e.downcast_ref::<Refused>() {
                return Err(Refused::new(refused.refusal, format!("{} at {addr}: {}", peer.name, refused.text)).into());
            }
            let e = explain_connect_error(e, &peer.name, peer.id, addr, identity.node_id());
            let text = format!("{e:#}");
            // The TLS handshake's refusal is rustls's, before any of ferry's codes can be sent.
            Err(if text.contains("trust") {
                Refused::new(Refusal::Untrusted, text).into()
            } else {
                Unreachable(text).into()
            })
        }
    }
}

/// What the peer's closing of a connection means for the round, from its close code.
pub(super) fn closed_error(
    why: Closed,
    peer: &crate::config::PeerConfig,
    addr: &str,
    identity: &Identity,
) -> anyhow::Error {
    match why.refusal {
        Some(Refusal::Untrusted) => Refused::new(
            Refusal::Untrusted,
            format!("{:#}", explain_connect_error(anyhow!(why.text), &peer.name, peer.id, addr, identity.node_id())),
        )
        .into(),
        Some(refusal) => Refused::new(refusal, format!("{} refused the round: {}", peer.name, why.text)).into(),
        // The TLS handshake's refusal (rustls's alert, with its text), before any of ferry's codes.
        None if why.text.contains("not trusted") => Refused::new(
            Refusal::Untrusted,
            format!("{:#}", explain_connect_error(anyhow!(why.text), &peer.name, peer.id, addr, identity.node_id())),
        )
        .into(),
        None => anyhow!("{} ended the round: {}", peer.name, why.text),
    }
}

/// Whether the destination refused because the job is busy there (a round or an import).
pub(super) fn is_busy(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Refused>().is_some_and(|r| r.refusal.is_busy())
}

/// `--wait`: how long to wait before asking a destination busy with the job again.
pub(super) const BUSY_RETRY: Duration = Duration::from_secs(15);

/// How long the destination has to answer a `Check`.
pub(super) const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the destination, on a connection of its own, whether it would accept a round of `job` now
/// (`Check`). This comes before the export hook and the scan, which on a large store take hours: a
/// peer that is down, does not trust this node, lacks the job or is busy with it is found in seconds,
/// with the error (and exit code) the round would have met. A peer that answers anything else (a
/// build without `Check`) is left to the round itself.
pub(super) async fn check_peer(
    client: &net::Client,
    (job, source): (&crate::config::JobConfig, u64),
    peer: &crate::config::PeerConfig,
    addr: &str,
    identity: &Identity,
    options: &PushOptions,
) -> anyhow::Result<()> {
    let connection = connect(client, peer, addr, identity, options).await?;
    let answer = tokio::time::timeout(CHECK_TIMEOUT, async {
        let (mut send, recv) = connection.open_bi().await.map_err(|_| ())?;
        net::send(&mut send, &Message::Check { job: job.name.clone(), source }).await.map_err(|_| ())?;
        let _ = send.finish();
        FrameReader::new(recv).next().await.map_err(|_| ())
    })
    .await;
    let result = match answer {
        Err(_) => Err(Unreachable(format!(
            "{} accepted the connection but did not answer within {} s whether it would take a round",
            peer.name,
            CHECK_TIMEOUT.as_secs()
        ))
        .into()),
        Ok(Ok(Some(Message::Welcome { .. }))) => {
            tracing::info!("{} would take a round of job {} now", peer.name, job.name);
            Ok(())
        }
        Ok(Ok(Some(Message::Refused { refusal, reason }))) => {
            Err(Refused::new(refusal, format!("{} refused the round: {reason}", peer.name)).into())
        }
        // Its state unreadable (a damaged manifest): no round can go on, so no export runs for one.
        Ok(Ok(Some(Message::Failed { reason }))) => {
            Err(anyhow::anyhow!("{} cannot take a round of job {}: {reason}", peer.name, job.name))
        }
        Ok(Ok(Some(other))) => {
            tracing::warn!("{} answered the check with {other:?}; going on with the round", peer.name);
            Ok(())
        }
        Ok(_) => match closed_error(why_closed(&connection).await, peer, addr, identity) {
            e if e.downcast_ref::<Refused>().is_some() => Err(e),
            e => {
                tracing::warn!("{} did not answer the check ({e:#}); going on with the round", peer.name);
                Ok(())
            }
        },
    };
    connection.close(net::close::DONE.into(), b"checked");
    result
}

/// True when the connection ended in a way a new connection may cure: a timeout, a reset, the
/// daemon shutting down or restarting.
pub(super) fn is_lost(connection: &quinn::Connection) -> bool {
    match connection.close_reason() {
        Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset) => true,
        // "Replaced": a connection of a killed earlier run whose Hello arrived late took the job over;
        // reconnecting takes it back (two live runs of one node cannot happen: the state lock).
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            Refusal::from_code(close.error_code.into_inner()).is_some_and(Refusal::may_reconnect)
        }
        Some(quinn::ConnectionError::ConnectionClosed(_)) => true,
        _ => false,
    }
}

pub(super) fn explain_connect_error(
    error: anyhow::Error,
    name: &str,
    pinned: ferry_certs::NodeId,
    addr: &str,
    me: ferry_certs::NodeId,
) -> anyhow::Error {
    let text = format!("{error:#}");
    if text.contains("aborted by peer") && text.contains("not trusted") {
        return anyhow!(
            "{name} at {addr} refused this node ({me}): it does not trust it. On {name}, run: ferry trust {me} --name <a name for this node>"
        );
    }
    if text.contains("not trusted") {
        let actual =
            text.split("node ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("another node");
        return anyhow!(
            "the node at {addr} is {actual}, not {pinned}, the node pinned as {name}: refusing it. If {name} was \
             re-initialised, pin its new ID: ferry trust {actual} --name {name} --addr {addr}"
        );
    }
    anyhow!("cannot connect to {name} ({pinned}) at {addr}: {text}")
}

/// Why the peer closed the connection: its own words when it gave them.
pub(super) async fn why_closed(connection: &quinn::Connection) -> Closed {
    let error = match tokio::time::timeout(Duration::from_secs(5), connection.closed()).await {
        Ok(error) => error,
        Err(_) => return Closed { refusal: None, text: "it stopped answering".to_owned() },
    };
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => Closed {
            refusal: Refusal::from_code(close.error_code.into_inner()),
            text: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        other => Closed { refusal: None, text: other.to_string() },
    }
}

/// Why the peer closed a connection: its refusal, when its close code is one, and its words.
pub(super) struct Closed {
    pub(super) refusal: Option<Refusal>,
    pub(super) text: String,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}
