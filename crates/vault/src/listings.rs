//! Tool listings cached from upstream MCP servers.

use crate::{Op, Store, StoreError, Tree};

impl Store {
    /// The last tool listing obtained from an upstream MCP server, so that
    /// a session-less `tools/list` can still show its tools. Sealed like
    /// every record; it never holds a token (the caller stores only the
    /// upstream's tool definitions).
    pub async fn mcp_listing(&self, server: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let key = format!("mcp-tools/{server}");
        self.get_as(Tree::Meta, key.as_bytes()).await
    }

    pub async fn put_mcp_listing(
        &self,
        server: &str,
        listing: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let key = format!("mcp-tools/{server}").into_bytes();
        let v = self.seal_json(Tree::Meta, &key, listing);
        self.batch(vec![Op::Put(Tree::Meta, key, v)]).await
    }
}
