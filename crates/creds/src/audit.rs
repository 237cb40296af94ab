//! The audit log: one record per proxied call and per admin write.
//!
//! The request path moves its record into a buffer under a short lock (no
//! wake-up, no I/O, no serialising: the JSON was a third of the request
//! path's own work). A background task serialises the buffered records
//! every `FLUSH_EVERY`, or sooner when they grow large or someone reads the
//! log, and hands them to one thread that seals and writes them.
//! A `kill -9` can lose the last interval's records; a graceful shutdown
//! writes everything.
//!
//! Requests refused before anyone was authenticated (no or a bad session
//! token, a webhook without its secret or signature) get no record each:
//! anyone can send them by the thousand, and each would push a record of
//! a real call out of the ring. They are counted instead, and written as
//! one summary record per kind every `SUMMARY_EVERY` (or when the log is
//! read): kind `refused`, the count in `error`.

use sidekey_base::sync::lock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::borrow::Cow;

use tokio::sync::{Notify, oneshot};

use crate::providers::Provider;
use crate::session::VerifiedSession;
use sidekey_vault::{AUDIT_BATCH, AuditRecord, Store, StoreError};

/// How often buffered records are written.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// A buffer this large is written at once.
const FLUSH_AT: usize = 4096;
/// Beyond this the writer is not keeping up: records are dropped (and
/// counted) rather than growing memory without bound.
const DROP_AT: usize = 65_536;
/// How often counts of refused unauthenticated requests are written.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// One kind of refused unauthenticated request, for the summary record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Refused {
    /// Route group, e.g. `/v1/proxy`, `/v1/elevenlabs/post-call`.
    pub path: &'static str,
    /// sidekey's error code and, for sessions, the reason.
    pub code: &'static str,
    pub reason: Option<&'static str>,
    pub status: u16,
}

/// Records waiting to be written, already as JSON arrays of at most
/// `AUDIT_BATCH` records: what the store seals as one value each.
#[derive(Default)]
struct Pending {
    done: Vec<(Vec<u8>, usize)>,
    current: Vec<u8>,
    in_current: usize,
}

impl Pending {
    /// Appends one serialised record.
    fn push(&mut self, json: &[u8]) {
        let sep = if self.in_current == 0 { b'[' } else { b',' };
        self.current.push(sep);
        self.current.extend_from_slice(json);
        self.in_current += 1;
        if self.in_current == AUDIT_BATCH {
            self.close_current();
        }
    }

    /// Ends the open JSON array and queues it as a batch.
    fn close_current(&mut self) {
        if self.in_current > 0 {
            self.current.push(b']');
            let n = std::mem::take(&mut self.in_current);
            self.done.push((std::mem::take(&mut self.current), n));
        }
    }

    fn take(&mut self) -> Vec<(Vec<u8>, usize)> {
        self.close_current();
        std::mem::take(&mut self.done)
    }
}

struct Shared {
    /// Records not yet serialised, in the order they were made.
    buf: Mutex<Vec<Entry>>,
    /// Answered once every record buffered before they registered is written.
    waiters: Mutex<Vec<oneshot::Sender<()>>>,
    wake: Notify,
    dropped: AtomicU64,
    /// Records the writer has taken from `buf` and not yet written: with
    /// `buf`'s length, what a `kill -9` would lose right now.
    writing: AtomicUsize,
    /// Refused unauthenticated requests since the last summary.
    refused: Mutex<std::collections::BTreeMap<Refused, u64>>,
}

/// Who made a proxied call, and to which provider, as far as the request
/// got: the session's and the provider's shared parts, not copies of their
/// strings. Each copy was a `malloc` on the agent worker and a `free` on
/// the writer's thread, glibc's slow cross-arena path. The access log and
/// the audit record read the same accessors.
#[derive(Default)]
pub struct Caller {
    pub session: Option<VerifiedSession>,
    /// The session's conversation is recorded only once its binding was
    /// checked (a refusal before that leaves it out).
    pub conversation: bool,
    pub provider: Option<Arc<Provider>>,
    /// The provider asked for, when none was selected (unknown, not in the
    /// session).
    pub requested: Option<String>,
}

impl Caller {
    pub fn user(&self) -> Option<&str> {
        self.session.as_ref().map(VerifiedSession::user)
    }

    pub fn session_id(&self) -> Option<&str> {
        self.session.as_ref().map(VerifiedSession::sid)
    }

    pub fn conversation_id(&self) -> Option<&str> {
        self.session
            .as_ref()
            .filter(|_| self.conversation)
            .and_then(VerifiedSession::conv)
    }

    /// The selected provider's name, or the one asked for.
    pub fn provider_name(&self) -> Option<&str> {
        self.provider
            .as_ref()
            .map(|p| p.name.as_str())
            .or(self.requested.as_deref())
    }
}

/// A proxied call's record as the request path leaves it.
pub struct ProxyRecord {
    /// Unix milliseconds.
    pub time: i64,
    pub caller: Caller,
    pub method: Cow<'static, str>,
    pub path: String,
    pub status: u16,
    pub duration_ms: f64,
    pub error: Option<&'static str>,
    /// The operation tool this call ran, if it was one.
    pub tool: Option<Arc<str>>,
    /// The JWT bearer subject the call's token was got for.
    pub subject: Option<String>,
}

enum Entry {
    Record(AuditRecord),
    Proxy(ProxyRecord),
}

/// A record's fields as written; both kinds of entry lend theirs.
struct Fields<'a> {
    time: i64,
    kind: &'a str,
    user: Option<&'a str>,
    provider: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    status: u16,
    duration_ms: f64,
    session_id: Option<&'a str>,
    conversation_id: Option<&'a str>,
    error: Option<&'a str>,
    tool: Option<&'a str>,
    subject: Option<&'a str>,
}

impl Entry {
    fn fields(&self) -> Fields<'_> {
        match self {
            Entry::Record(r) => Fields {
                time: r.time,
                kind: &r.kind,
                user: r.user.as_deref(),
                provider: r.provider.as_deref(),
                method: &r.method,
                path: &r.path,
                status: r.status,
                duration_ms: r.duration_ms,
                session_id: r.session_id.as_deref(),
                conversation_id: r.conversation_id.as_deref(),
                error: r.error.as_deref(),
                tool: r.tool.as_deref(),
                subject: r.subject.as_deref(),
            },
            Entry::Proxy(r) => Fields {
                time: r.time,
                kind: "proxy",
                user: r.caller.user(),
                provider: r.caller.provider_name(),
                method: &r.method,
                path: &r.path,
                status: r.status,
                duration_ms: r.duration_ms,
                session_id: r.caller.session_id(),
                conversation_id: r.caller.conversation_id(),
                error: r.error,
                tool: r.tool.as_deref(),
                subject: r.subject.as_deref(),
            },
        }
    }
}

/// Buffered records as JSON batches for the store.
fn serialise(records: Vec<Entry>) -> Vec<(Vec<u8>, usize)> {
    let mut p = Pending::default();
    let mut json = Vec::with_capacity(384);
    for r in records {
        json.clear();
        write_record(&r.fields(), &mut json);
        p.push(&json);
    }
    p.take()
}

/// A record as a JSON array of its fields in [`AuditRecord`]'s order,
/// an absent one as `null`: byte for byte what serde_json writes for the
/// tuple of the fields (a unit test compares the two), and what
/// `AuditRecord`'s derived `Deserialize` reads back (serde reads a struct
/// from the sequence of its fields as well as from a map, so records
/// written as objects before read as they did). Without the field names
/// a record is about 40 % shorter, and the store seals, checksums and
/// keeps it by the byte. By hand rather than through serde_json: it copies
/// a string that needs no escape (every audited string, in practice) in
/// one go, where serde_json looks each byte up in its escape table.
fn write_record(r: &Fields<'_>, out: &mut Vec<u8>) {
    use serde_json::ser::{CompactFormatter, Formatter};
    let mut f = CompactFormatter;
    // Writes into a Vec cannot fail.
    out.push(b'[');
    let _ = f.write_i64(out, r.time);
    field_str(out, r.kind);
    field_opt(out, r.user);
    field_opt(out, r.provider);
    field_str(out, r.method);
    field_str(out, r.path);
    out.push(b',');
    let _ = f.write_u16(out, r.status);
    out.push(b',');
    if r.duration_ms.is_finite() {
        let _ = f.write_f64(out, r.duration_ms);
    } else {
        out.extend_from_slice(b"null");
    }
    field_opt(out, r.session_id);
    field_opt(out, r.conversation_id);
    field_opt(out, r.error);
    field_opt(out, r.tool);
    field_opt(out, r.subject);
    out.push(b']');
}

/// `,` and the string, or `null`.
#[inline(always)]
fn field_opt(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(v) => field_str(out, v),
        None => out.extend_from_slice(b",null"),
    }
}

#[inline(always)]
fn field_str(out: &mut Vec<u8>, value: &str) {
    out.push(b',');
    json_str(out, value);
}

/// A JSON string with serde_json's escapes: `\"`, `\\`, `\b \t \n \f \r`,
/// `\u00xx` for the other control characters; everything else as is.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.push(b'"');
    // No early exit: the loop vectorises, and audited strings are short.
    let needs_escape = b.iter().fold(false, |acc, &c| {
        acc | (c < 0x20) | (c == b'"') | (c == b'\\')
    });
    if !needs_escape {
        out.extend_from_slice(b);
    } else {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut start = 0;
        for (i, &c) in b.iter().enumerate() {
            let esc: &[u8] = match c {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                0x08 => b"\\b",
                0x09 => b"\\t",
                0x0a => b"\\n",
                0x0c => b"\\f",
                0x0d => b"\\r",
                c if c < 0x20 => &[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(c >> 4) as usize],
                    HEX[(c & 0xf) as usize],
                ],
                _ => continue,
            };
            out.extend_from_slice(&b[start..i]);
            out.extend_from_slice(esc);
            start = i + 1;
        }
        out.extend_from_slice(&b[start..]);
    }
    out.push(b'"');
}

/// The summary records for `counts`.
fn summary(counts: std::collections::BTreeMap<Refused, u64>) -> Vec<AuditRecord> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    counts
        .into_iter()
        .map(|(k, n)| {
            let what = match k.reason {
                Some(r) => format!("{} ({r})", k.code),
                None => k.code.to_owned(),
            };
            AuditRecord {
                time: now,
                kind: "refused".into(),
                user: None,
                provider: None,
                method: "*".into(),
                path: k.path.into(),
                status: k.status,
                duration_ms: 0.0,
                session_id: None,
                conversation_id: None,
                error: Some(format!("{what} x{n}")),
                tool: None,
                subject: None,
            }
        })
        .collect()
}

pub use sidekey_base::metrics::AuditBacklog as Backlog;

/// Sealed batches for the store, and where to answer once written.
type Job = (
    Vec<(Vec<u8>, usize)>,
    oneshot::Sender<Result<(), StoreError>>,
);

/// The one thread that writes audit batches into the store (sled writes
/// block). It used to be `spawn_blocking`, which does not keep consecutive
/// writes on one thread; sled frees what a write replaces through
/// crossbeam-epoch (garbage kept per thread until that thread runs again)
/// and glibc serves each thread from its own arena. A saturation soak's
/// peak RSS varied from 85 to 135 MiB with it, 64 to 75 MiB with this
/// thread (docs/performance.md, round 9).
fn spawn_store_thread(store: Arc<Store>, max_records: usize) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rt = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("sidekey-audit".into())
        .spawn(move || {
            // Ends when the writer task drops its sender.
            for (batches, done) in rx {
                // A panic fails this write, not every later one.
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rt.block_on(store.append_audit_json(&batches, max_records))
                }))
                .unwrap_or_else(|_| Err(StoreError::Io("the audit write panicked".into())));
                let _ = done.send(res);
            }
        });
    if let Err(e) = spawned {
        // Every write then fails and is logged by the writer task.
        tracing::error!(error = %e, "cannot start the audit writer thread");
    }
    tx
}

fn gone() -> StoreError {
    StoreError::Io("the audit writer thread is not running".into())
}

pub struct AuditLog {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish()
    }
}

impl AuditLog {
    /// Starts the writer; `enabled = false` gives a log that discards.
    pub fn start(store: Arc<Store>, enabled: bool, max_records: usize) -> AuditLog {
        if !enabled {
            return AuditLog { shared: None };
        }
        let shared = Arc::new(Shared {
            buf: Mutex::new(Vec::new()),
            waiters: Mutex::new(Vec::new()),
            wake: Notify::new(),
            dropped: AtomicU64::new(0),
            writing: AtomicUsize::new(0),
            refused: Mutex::new(std::collections::BTreeMap::new()),
        });
        let jobs = spawn_store_thread(store, max_records);
        let s = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_summary = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = s.wake.notified() => {}
                }
                // Waiters first: every record buffered before a waiter
                // registered is then in `records` below.
                let waiters = std::mem::take(&mut *lock(&s.waiters));
                let mut records = {
                    let mut buf = lock(&s.buf);
                    // The next interval likely needs as much room: allocate
                    // it here, not on a request's first push.
                    let room = buf.len();
                    std::mem::replace(&mut *buf, Vec::with_capacity(room))
                };
                if !waiters.is_empty() || last_summary.elapsed() >= SUMMARY_EVERY {
                    last_summary = tokio::time::Instant::now();
                    let counts = std::mem::take(&mut *lock(&s.refused));
                    records.extend(summary(counts).into_iter().map(Entry::Record));
                }
                s.writing.store(records.len(), Ordering::Relaxed);
                let batches = serialise(records);
                if !batches.is_empty() {
                    let (done, written) = oneshot::channel();
                    let res = match jobs.send((batches, done)) {
                        Ok(()) => written.await.unwrap_or_else(|_| Err(gone())),
                        Err(_) => Err(gone()),
                    };
                    if let Err(e) = res {
                        tracing::error!(error = %e, "cannot write audit records");
                    }
                }
                s.writing.store(0, Ordering::Relaxed);
                for w in waiters {
                    let _ = w.send(());
                }
                if Arc::strong_count(&s) == 1 {
                    break;
                }
            }
        });
        AuditLog {
            shared: Some(shared),
        }
    }

    /// Buffers a record: moved in under a short lock, serialised by the
    /// writer.
    pub fn record(&self, r: AuditRecord) {
        self.push(Entry::Record(r));
    }

    /// Buffers a proxied call's record (see [`ProxyRecord`]).
    pub fn record_proxy(&self, r: ProxyRecord) {
        self.push(Entry::Proxy(r));
    }

    fn push(&self, r: Entry) {
        let Some(s) = &self.shared else { return };
        let total = {
            let mut buf = lock(&s.buf);
            if buf.len() >= DROP_AT {
                drop(buf);
                drop(r);
                let n = s.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "audit writer falling behind; records dropped");
                }
                return;
            }
            buf.push(r);
            buf.len()
        };
        if total == FLUSH_AT {
            s.wake.notify_one();
        }
    }

    /// Counts a refused unauthenticated request (see the module comment).
    pub fn refused(&self, r: Refused) {
        let Some(s) = &self.shared else { return };
        *lock(&s.refused).entry(r).or_insert(0) += 1;
    }

    /// Records buffered or being written, and records dropped since start
    /// because the writer fell `DROP_AT` behind: for the metrics.
    pub fn backlog(&self) -> Backlog {
        let Some(s) = &self.shared else {
            return Backlog::default();
        };
        Backlog {
            pending: lock(&s.buf).len() + s.writing.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
        }
    }

    /// Waits until every record buffered so far is written.
    pub async fn sync(&self) {
        let Some(s) = &self.shared else { return };
        let (tx, rx) = oneshot::channel();
        lock(&s.waiters).push(tx);
        s.wake.notify_one();
        let _ = rx.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(s: &str, some: bool, duration_ms: f64) -> AuditRecord {
        let opt = |v: &str| some.then(|| v.to_owned());
        AuditRecord {
            time: 1_764_000_000_123,
            kind: "proxy".into(),
            user: opt(s),
            provider: opt("slack"),
            method: "POST".into(),
            path: s.to_owned(),
            status: 200,
            duration_ms,
            session_id: opt(&format!("sid-{s}")),
            conversation_id: opt(s),
            error: opt(s),
            tool: None,
            subject: None,
        }
    }

    /// The fields of `r` as serde_json writes them for a tuple: the form
    /// `write_record` must match.
    fn serde_form(r: &AuditRecord) -> Vec<u8> {
        serde_json::to_vec(&(
            r.time,
            &r.kind,
            &r.user,
            &r.provider,
            &r.method,
            &r.path,
            r.status,
            r.duration_ms,
            &r.session_id,
            &r.conversation_id,
            &r.error,
            &r.tool,
            &r.subject,
        ))
        .unwrap()
    }

    /// The hand-written writer against serde_json, byte for byte: every
    /// ASCII character alone and in context, non-ASCII text, absent
    /// fields, and the numbers the writer sees; and every record reads
    /// back as the `AuditRecord` it was.
    #[test]
    fn records_are_written_exactly_as_serde_json_writes_them() {
        let mut strings: Vec<String> = (0u8..0x80)
            .map(|c| (c as char).to_string())
            .chain((0u8..0x80).map(|c| format!("/a{}b/", c as char)))
            .collect();
        strings.extend(
            [
                "",
                "/chat.postMessage",
                "ünïcødé ✓ 日本 🎉",
                "\"quoted\" \\back\\ \u{7f}\u{1f}\r\n\t",
                "x\u{0}y\u{8}z\u{c}",
            ]
            .map(String::from),
        );
        let numbers = [0.0, 1.0, 0.123, 12.5, 1234.567, 1e-7, 1e21, 3.0e300];
        let mut mine = Vec::new();
        for (i, s) in strings.iter().enumerate() {
            for some in [true, false] {
                let r = record(s, some, numbers[i % numbers.len()]);
                mine.clear();
                write_record(&Entry::Record(r.clone()).fields(), &mut mine);
                assert_eq!(
                    String::from_utf8_lossy(&mine),
                    String::from_utf8_lossy(&serde_form(&r)),
                    "{s:?}"
                );
                let back: AuditRecord = serde_json::from_slice(&mine).unwrap();
                assert_eq!(back, r);
            }
        }
        let mut r = record("x", true, f64::NAN);
        mine.clear();
        write_record(&Entry::Record(r.clone()).fields(), &mut mine);
        assert_eq!(mine, serde_form(&r));
        r.duration_ms = f64::INFINITY;
        mine.clear();
        write_record(&Entry::Record(r.clone()).fields(), &mut mine);
        assert_eq!(mine, serde_form(&r));
    }

    /// Records written as objects (before round 10) and as arrays read
    /// back alike, in one batch or in batches of either form.
    #[test]
    fn object_and_array_records_read_alike() {
        let a = record("a", true, 1.5);
        let b = record("b", false, 0.25);
        let mut arr = Vec::new();
        write_record(&Entry::Record(b.clone()).fields(), &mut arr);
        let batch = format!(
            "[{},{}]",
            serde_json::to_string(&a).unwrap(),
            String::from_utf8(arr).unwrap()
        );
        let back: Vec<AuditRecord> = serde_json::from_str(&batch).unwrap();
        assert_eq!(back, [a, b]);
    }

    #[test]
    fn batches_are_json_arrays_of_at_most_the_batch_size() {
        let n = AUDIT_BATCH + 3;
        let batches = serialise(
            (0..n)
                .map(|i| Entry::Record(record(&i.to_string(), i % 2 == 0, 1.5)))
                .collect(),
        );
        assert_eq!(
            batches.iter().map(|b| b.1).collect::<Vec<_>>(),
            [AUDIT_BATCH, 3]
        );
        let mut all = Vec::new();
        for (json, count) in batches {
            let part: Vec<AuditRecord> = serde_json::from_slice(&json).unwrap();
            assert_eq!(part.len(), count);
            all.extend(part);
        }
        assert_eq!(all.len(), n);
        assert_eq!(all[5], record("5", false, 1.5));
    }

    fn proxy_record(
        session: Option<VerifiedSession>,
        conversation: bool,
        requested: Option<&str>,
        error: Option<&'static str>,
    ) -> ProxyRecord {
        ProxyRecord {
            time: 1_764_000_000_123,
            caller: Caller {
                session,
                conversation,
                provider: None,
                requested: requested.map(str::to_owned),
            },
            method: "GET".into(),
            path: "/conversations.list".into(),
            status: 200,
            duration_ms: 0.25,
            error,
            tool: None,
            subject: None,
        }
    }

    /// A proxied call's record is written as the `AuditRecord` with the
    /// session's user, id and conversation would be.
    #[test]
    fn proxy_records_lend_the_sessions_strings() {
        let session = VerifiedSession::for_test(
            "sid-1",
            sidekey_vault::SessionRecord {
                user: "alice".into(),
                providers: vec!["slack".into()],
                iat: 1,
                exp: 2,
                conv: Some("conv_1".into()),
            },
        );
        let expected =
            |conv: Option<&str>, provider: Option<&str>, error: Option<&str>| AuditRecord {
                time: 1_764_000_000_123,
                kind: "proxy".into(),
                user: Some("alice".into()),
                provider: provider.map(str::to_owned),
                method: "GET".into(),
                path: "/conversations.list".into(),
                status: 200,
                duration_ms: 0.25,
                session_id: Some("sid-1".into()),
                conversation_id: conv.map(str::to_owned),
                error: error.map(str::to_owned),
                tool: None,
                subject: None,
            };
        let written = |r: ProxyRecord| {
            let mut out = Vec::new();
            write_record(&Entry::Proxy(r).fields(), &mut out);
            serde_json::from_slice::<AuditRecord>(&out).unwrap()
        };
        let s = || Some(session.clone());
        assert_eq!(
            written(proxy_record(s(), true, Some("slack"), None)),
            expected(Some("conv_1"), Some("slack"), None)
        );
        // Refused before its binding was checked: no conversation.
        assert_eq!(
            written(proxy_record(
                s(),
                false,
                Some("nope"),
                Some("unknown_provider")
            )),
            expected(None, Some("nope"), Some("unknown_provider"))
        );
        let mut bound = session.clone();
        bound.bound_to("conv_2");
        assert_eq!(
            written(proxy_record(Some(bound), true, None, None))
                .conversation_id
                .as_deref(),
            Some("conv_2")
        );
        let anonymous = written(proxy_record(None, true, None, Some("invalid_session")));
        assert!(
            anonymous.user.is_none() && anonymous.session_id.is_none(),
            "{anonymous:?}"
        );
    }

    /// The backlog the metrics report: records waiting while the writer
    /// has not run, drops beyond `DROP_AT`, and nothing pending once the
    /// writer thread has put the kept records in the store.
    #[tokio::test]
    async fn backlog_counts_pending_and_dropped_records_until_written() {
        use sidekey_vault::{KeyRing, MasterKey, StoreOptions};
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::new(MasterKey::from_bytes(&[7; 32]), vec![]);
        let store =
            Arc::new(Store::open(&dir.path().join("db"), ring, StoreOptions::default()).unwrap());
        let log = AuditLog::start(store.clone(), true, 10);
        // On this current-thread runtime the writer task cannot run until
        // the test yields, so every push lands in the buffer.
        for i in 0..DROP_AT + 3 {
            log.record(record(&format!("r{i}"), i % 2 == 0, 1.0));
        }
        assert_eq!(
            log.backlog(),
            Backlog {
                pending: DROP_AT,
                dropped: 3
            }
        );
        log.sync().await;
        assert_eq!(
            log.backlog(),
            Backlog {
                pending: 0,
                dropped: 3
            }
        );
        let kept = store.recent_audit(None, 100).await.unwrap();
        let paths: Vec<&str> = kept.iter().map(|r| r.path.as_str()).collect();
        let want: Vec<String> = (DROP_AT - 10..DROP_AT)
            .rev()
            .map(|i| format!("r{i}"))
            .collect();
        assert_eq!(paths, want);
        assert_eq!(
            AuditLog::start(store, false, 10).backlog(),
            Backlog::default()
        );
    }
}
