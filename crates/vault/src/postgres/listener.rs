//! The change listener: one LISTEN connection per process, outside the
//! pool (LISTEN does not survive PgBouncer's transaction mode), that
//! evicts cache entries on other replicas' writes and tells, by a
//! heartbeat it sends itself, whether it still hears them.

use std::sync::Arc;
use std::time::Duration;

use super::CHANNEL;
use super::connect_error;
use super::target::Target;
use crate::Caches;

/// How often the listener notifies itself.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);
/// A heartbeat this late means notifications may be stalled: the caches are
/// bypassed until the next one arrives.
const HEARTBEAT_LATE: Duration = Duration::from_millis(500);
/// A heartbeat this late means the connection is given up and replaced.
const HEARTBEAT_DEAD: Duration = Duration::from_secs(3);

/// The application name of a process's LISTEN connection.
pub(super) fn listener_name(owner: &str) -> String {
    format!("sidekey listener {owner}")
}

/// The channel a process's heartbeat goes to: its own, so replicas do not
/// hear each other's.
fn heartbeat_channel(owner: &str) -> String {
    format!("sidekey_heartbeat_{}", owner.replace('-', "_"))
}

/// Holds one LISTEN connection for the life of the process. While it is
/// down, or its heartbeat is late, the caches are bypassed (`live` false);
/// after every (re)connect they are cleared, since notifications may have
/// been missed.
pub(super) async fn listen_forever(target: Target, caches: Arc<Caches>, owner: String) {
    let mut delay = Duration::from_millis(50);
    loop {
        let started = tokio::time::Instant::now();
        if let Err(e) = listen_once(&target, &caches, &owner).await {
            tracing::warn!(error = %e, "PostgreSQL change listener down; caches bypassed until it reconnects");
        }
        caches.set_live(false);
        // A connection that served for a while earns a quick reconnect;
        // one that keeps failing is retried at most once a second.
        if started.elapsed() > Duration::from_secs(10) {
            delay = Duration::from_millis(50);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Aborts a task when dropped (the heartbeat sender ends with its listener).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One LISTEN connection, until it fails.
///
/// The connection notifies itself on a channel of its own every
/// [`HEARTBEAT_EVERY`]. That notification comes back through the queue
/// every other replica's writes go through, in commit order: hearing it
/// means every notification committed before it was heard too. A
/// connection can hang without closing (a stopped backend, a partition, a
/// failover that leaves it open), and would then look connected while
/// revocations go unheard: once the heartbeat is [`HEARTBEAT_LATE`], the
/// caches are bypassed, so every use re-reads the store; after
/// [`HEARTBEAT_DEAD`] the connection is replaced.
async fn listen_once(target: &Target, caches: &Arc<Caches>, owner: &str) -> Result<(), String> {
    use futures_util::StreamExt;
    // Operators (and tests) find it in pg_stat_activity by this name.
    let mut config = target.config.clone();
    config.application_name(listener_name(owner));
    let (client, mut conn) = config
        .connect(target.tls.clone())
        .await
        .map_err(|e| connect_error(&e))?;
    let beat = heartbeat_channel(owner);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = stream.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let what = (n.channel().to_owned(), n.payload().to_owned());
                    if tx.send(what).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(connect_error(&e)),
            }
        }
        Ok(())
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN \"{beat}\""))
        .await
        .map_err(|e| connect_error(&e))?;
    // Anything cached before this point may have missed a notification.
    caches.clear_all();
    tracing::debug!("PostgreSQL change listener connected");
    let client = Arc::new(client);
    let _sender = {
        let client = client.clone();
        let notify = format!("NOTIFY \"{beat}\"");
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // One beat in flight at a time: on a hung backend this one
                // waits, and the receiving side notices the silence.
                let _ = tokio::time::timeout(HEARTBEAT_DEAD, client.batch_execute(&notify)).await;
            }
        }))
    };
    // Live (caches used) from the first heartbeat on.
    let mut live = false;
    let mut last = tokio::time::Instant::now();
    let result = loop {
        let due = last + if live { HEARTBEAT_LATE } else { HEARTBEAT_DEAD };
        tokio::select! {
            m = rx.recv() => match m {
                Some((channel, _)) if channel == beat => {
                    last = tokio::time::Instant::now();
                    if !live {
                        // Notifications are heard in commit order, so every
                        // eviction up to this beat has been applied, and
                        // nothing was cached while bypassed.
                        live = true;
                        caches.set_live(true);
                    }
                }
                Some((_, payload)) => caches.on_change(&payload),
                None => break Err("listener connection closed".to_owned()),
            },
            _ = tokio::time::sleep_until(due) => {
                if live {
                    live = false;
                    caches.set_live(false);
                    tracing::warn!(
                        late_ms = last.elapsed().as_millis() as u64,
                        "PostgreSQL change listener's heartbeat is late; caches bypassed until it arrives"
                    );
                } else {
                    break Err(format!(
                        "no heartbeat on the listener connection for {} s",
                        HEARTBEAT_DEAD.as_secs()
                    ));
                }
            }
        }
    };
    caches.set_live(false);
    driver.abort();
    match driver.await {
        Ok(Err(e)) => Err(e),
        _ => result,
    }
}
