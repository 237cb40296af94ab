//! Several sidekey replicas on one PostgreSQL database, as a deployment
//! runs them (tests/cluster.rs, tests/replica_faults.rs).

use std::path::Path;
use std::sync::Arc;

use super::{Options, Sidekey};

/// Starts `n` replicas on one fresh database, sharing the master key,
/// session key, admin token and certificate, as a deployment would.
pub async fn replicas(n: usize, opts: Options) -> Vec<Sidekey> {
    let opts = if opts.on_postgres() {
        opts
    } else {
        opts.postgres()
    };
    let first = Sidekey::start(opts.clone()).await;
    let mut all = vec![first];
    for _ in 1..n {
        let dir = tempfile::tempdir().unwrap();
        share_secrets(all[0].path(), dir.path());
        all.push(Sidekey::start_in(Arc::new(dir), opts.clone()).await);
    }
    all
}

pub fn share_secrets(from: &Path, to: &Path) {
    for sub in ["data", "certs"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
    }
    for f in [
        "data/master.key",
        "data/session.key",
        "data/admin.token",
        "certs/server.crt",
        "certs/server.key",
    ] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}
