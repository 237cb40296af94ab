//! `Mcp-Session-Id`s: issued at `initialize`, ended by `DELETE`. Apart from
//! the server so that `App` can hold them without reaching into MCP.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

/// Session ids this replica issued and ended. An id carries no identity,
/// so one issued elsewhere (another replica, a restart) is served too;
/// only an ended one is refused, as the transport says.
#[derive(Default)]
pub struct McpSessions {
    ended: Mutex<Ended>,
    live: Mutex<HashSet<String>>,
}

/// Ended ids, looked up by hash, forgotten oldest first.
#[derive(Default)]
struct Ended {
    set: HashSet<String>,
    order: VecDeque<String>,
}

/// Ended ids remembered (oldest forgotten first).
const ENDED_KEPT: usize = 10_000;
/// Live ids remembered, for `DELETE`.
const LIVE_KEPT: usize = 100_000;

impl McpSessions {
    pub fn issue(&self) -> String {
        let id = crate::random::random_b64(18);
        let mut live = sidekey_base::sync::lock(&self.live);
        if live.len() >= LIVE_KEPT {
            live.clear();
        }
        live.insert(id.clone());
        id
    }

    pub fn end(&self, id: &str) -> bool {
        let known = sidekey_base::sync::lock(&self.live).remove(id);
        if known {
            let mut ended = sidekey_base::sync::lock(&self.ended);
            if ended.order.len() >= ENDED_KEPT {
                if let Some(old) = ended.order.pop_front() {
                    ended.set.remove(&old);
                }
            }
            ended.set.insert(id.to_owned());
            ended.order.push_back(id.to_owned());
        }
        known
    }

    pub fn is_ended(&self, id: &str) -> bool {
        sidekey_base::sync::lock(&self.ended).set.contains(id)
    }
}
