//! Mesh veths: the veth pair that holds this host's mesh address on a
//! network (see [`crate::dataplane::MeshVethSpec`]), made whole or not at
//! all.

use std::net::IpAddr;

use super::{EEXIST, NetlinkDataplane, errno, messages, nl};
use crate::dataplane::{MeshVethSpec, Result};

impl NetlinkDataplane {
    pub(super) async fn create_mesh_veth(&self, v: &MeshVethSpec) -> Result<()> {
        // A leftover of an attempt that died half-way goes first.
        self.delete_link(&v.port).await?;
        self.delete_link(&v.ifname).await?;
        let pair = messages::veth(&v.port, &v.ifname, v.mac, v.mtu, None);
        self.handle.link().add(pair).execute().await.map_err(nl("create mesh veth", &v.port))?;
        let result = self.plug_mesh_veth(v).await;
        if result.is_err() {
            // Nothing half-made: both ends go with one delete.
            if let Err(e) = self.delete_link(&v.port).await {
                tracing::warn!(link = %v.port, error = %e, "cleaning up a failed mesh veth");
            }
        }
        result
    }

    async fn plug_mesh_veth(&self, v: &MeshVethSpec) -> Result<()> {
        // Before they come up (no IPv6 address to start with).
        for s in &v.sysctls {
            if let Err(e) = std::fs::write(&s.path, &s.value) {
                tracing::warn!(device = %v.ifname, path = %s.path, error = %e, "mesh veth sysctl");
            }
        }
        let inside = Self::require(&self.handle, &v.ifname).await?;
        match self.handle.address().add(inside, IpAddr::V4(v.addr), 32).execute().await {
            Err(e) if errno(&e) == Some(EEXIST) => {}
            r => r.map_err(nl("add mesh address", format!("{}/32 on {}", v.addr, v.ifname)))?,
        }
        self.handle
            .link()
            .set(messages::set_link(inside, v.mtu, None))
            .execute()
            .await
            .map_err(nl("set mesh veth up", &v.ifname))?;
        let bridge = Self::require(&self.handle, &v.bridge).await?;
        let port = Self::require(&self.handle, &v.port).await?;
        self.handle
            .link()
            .set(messages::set_link(port, v.mtu, Some(bridge)))
            .execute()
            .await
            .map_err(nl("attach mesh veth to bridge", format!("{} → {}", v.port, v.bridge)))?;
        let mut request = self.handle.neighbours().add_bridge(port, &[]);
        *request.message_mut() = messages::port_fdb_static(port, v.mac);
        request
            .replace()
            .execute()
            .await
            .map_err(nl("add bridge fdb entry", format!("{} on {} ({})", v.mac, v.port, v.bridge)))
    }
}
