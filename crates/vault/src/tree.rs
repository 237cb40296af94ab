//! Where records live: the trees (namespaces) a backend stores, the writes
//! of a batch, and the layouts of the keys the front builds.

/// What a backend stores: one namespace per kind of record. The name is
/// part of every record's associated data, so a record cannot be moved to
/// another tree or key without failing to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tree {
    Credentials = 0,
    Sessions = 1,
    Users = 2,
    Phones = 3,
    OAuthStates = 4,
    Audit = 5,
    Meta = 6,
    /// `<conv>\0<sid>` → empty: sessions of a conversation without a scan.
    ConvIndex = 7,
    /// `<user>\0<sid>` → empty: sessions of a user, for user deletion.
    UserSessions = 8,
    /// `<exp big-endian>\0<sid>` → empty: expired sessions in order, for GC.
    SessionExpiry = 9,
    /// Connect-page tickets, by keyed hash.
    Tickets = 10,
    /// Credentials waiting for the app's confirmation (`[connect] confirm`),
    /// by keyed hash of their one-time code.
    PendingConnect = 11,
}

impl Tree {
    pub const ALL: [Tree; 12] = [
        Tree::Credentials,
        Tree::Sessions,
        Tree::Users,
        Tree::Phones,
        Tree::OAuthStates,
        Tree::Audit,
        Tree::Meta,
        Tree::ConvIndex,
        Tree::UserSessions,
        Tree::SessionExpiry,
        Tree::Tickets,
        Tree::PendingConnect,
    ];

    /// The sled tree name, and the prefix of every record's AAD.
    pub fn name(self) -> &'static str {
        match self {
            Tree::Credentials => "credentials",
            Tree::Sessions => "sessions",
            Tree::Users => "users",
            Tree::Phones => "phones",
            Tree::OAuthStates => "oauth_states",
            Tree::Audit => "audit",
            Tree::Meta => "meta",
            Tree::ConvIndex => "conv_index",
            Tree::UserSessions => "user_sessions",
            Tree::SessionExpiry => "session_expiry",
            Tree::Tickets => "connect_tickets",
            Tree::PendingConnect => "connect_pending",
        }
    }

    /// The namespace column in PostgreSQL.
    pub fn ns(self) -> i16 {
        self as i16
    }

    /// Trees whose values are sealed (the indexes hold empty values).
    pub fn sealed(self) -> bool {
        !matches!(
            self,
            Tree::ConvIndex | Tree::UserSessions | Tree::SessionExpiry
        )
    }

    pub(crate) fn from_ns(n: i16) -> Option<Tree> {
        Tree::ALL.iter().copied().find(|t| t.ns() == n)
    }
}

/// One write of a [`Store::batch`].
#[derive(Debug)]
pub enum Op {
    Put(Tree, Vec<u8>, Vec<u8>),
    /// Writes only if the key is absent (a migration never overwrites
    /// what the target already holds).
    Insert(Tree, Vec<u8>, Vec<u8>),
    Remove(Tree, Vec<u8>),
}

pub(crate) fn aad(t: Tree, key: &[u8]) -> Vec<u8> {
    let name = t.name();
    let mut a = Vec::with_capacity(name.len() + 1 + key.len());
    a.extend_from_slice(name.as_bytes());
    a.push(b'/');
    a.extend_from_slice(key);
    a
}

/// Audit keys are `<id: 8 bytes BE><records in the batch: 2 bytes BE>`,
/// so counting and trimming never decrypt a batch.
pub(crate) fn audit_key(id: u64, n: usize) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..8].copy_from_slice(&id.to_be_bytes());
    k[8..].copy_from_slice(&(n.min(u16::MAX as usize) as u16).to_be_bytes());
    k
}

/// Records in an audit batch, from its key.
pub(crate) fn audit_key_count(k: &[u8]) -> usize {
    if k.len() == 10 {
        u16::from_be_bytes([k[8], k[9]]) as usize
    } else {
        0
    }
}

/// `<a>\0<b>`: an index key (a conversation or user, then a session id),
/// so a prefix scan finds one owner's entries.
pub(crate) fn join0(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + b.len());
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

/// `<exp big-endian>\0<sid>`: sessions in expiry order.
pub(crate) fn expiry_key(exp: i64, sid: &str) -> Vec<u8> {
    let mut k = (exp.max(0) as u64).to_be_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(sid.as_bytes());
    k
}
