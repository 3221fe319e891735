//! The Docker engine's API, read-only: where the Docker driver learns what
//! the plugin protocol leaves out (network names, container names, aliases
//! and labels). HTTP/1.1 over the engine's unix socket.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the Docker engine at {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("Docker engine API {path}: {msg}")]
    Http { path: String, msg: String },
    #[error("Docker engine API {path}: not found")]
    NotFound { path: String },
    #[error("Docker engine API {path}: unexpected answer: {source}")]
    Decode { path: String, source: serde_json::Error },
}

/// A Docker engine reachable on a unix socket.
#[derive(Clone, Debug)]
pub struct Engine {
    pub socket: PathBuf,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NetworkInfo {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// `docker network create --attachable` (the engine does not pass it
    /// to the driver).
    #[serde(rename = "Attachable", default)]
    pub attachable: bool,
    /// Container id → its endpoint on the network.
    #[serde(rename = "Containers", default)]
    pub containers: Option<BTreeMap<String, NetworkContainer>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NetworkContainer {
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContainerInfo {
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Config", default)]
    pub config: Option<ContainerConfig>,
    #[serde(rename = "NetworkSettings", default)]
    pub network_settings: Option<NetworkSettings>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContainerConfig {
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NetworkSettings {
    #[serde(rename = "Networks", default)]
    pub networks: Option<BTreeMap<String, ContainerNetwork>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContainerNetwork {
    #[serde(rename = "Aliases", default)]
    pub aliases: Option<Vec<String>>,
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
}

impl ContainerInfo {
    /// The container's name without Docker's leading slash.
    pub fn short_name(&self) -> &str {
        self.name.trim_start_matches('/')
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        self.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default()
    }

    /// Its aliases on `network`, without the name and the short id Docker
    /// adds to every container.
    pub fn aliases(&self, network: &str) -> Vec<String> {
        let all = self
            .network_settings
            .as_ref()
            .and_then(|s| s.networks.as_ref())
            .and_then(|n| n.get(network))
            .and_then(|n| n.aliases.clone())
            .unwrap_or_default();
        let short_id = &self.id[..self.id.len().min(12)];
        let mut out: Vec<String> =
            all.into_iter().filter(|a| a != self.short_name() && a != short_id && !a.is_empty()).collect();
        out.sort();
        out.dedup();
        out
    }
}

impl Engine {
    async fn get<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, EngineError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| EngineError::Connect { path: self.socket.clone(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| EngineError::Http { path: path.to_string(), msg: e.to_string() })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get(path)
            .header("Host", "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| EngineError::Http { path: path.to_string(), msg: e.to_string() })?;
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| EngineError::Http { path: path.to_string(), msg: "no answer in 10 s".into() })?
            .map_err(|e| EngineError::Http { path: path.to_string(), msg: e.to_string() })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| EngineError::Http { path: path.to_string(), msg: e.to_string() })?
            .to_bytes();
        if status == hyper::StatusCode::NOT_FOUND {
            return Err(EngineError::NotFound { path: path.to_string() });
        }
        if !status.is_success() {
            return Err(EngineError::Http {
                path: path.to_string(),
                msg: format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
            });
        }
        serde_json::from_slice(&body).map_err(|source| EngineError::Decode { path: path.to_string(), source })
    }

    pub async fn network(&self, id: &str) -> Result<NetworkInfo, EngineError> {
        self.get(&format!("/networks/{id}")).await
    }

    pub async fn container(&self, id: &str) -> Result<ContainerInfo, EngineError> {
        self.get(&format!("/containers/{id}/json")).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_identity_from_inspect() {
        let c: ContainerInfo = serde_json::from_str(
            r#"{"Id":"0123456789abcdef0123","Name":"/web1","Config":{"Labels":{"trellis.service":"web"}},
                "NetworkSettings":{"Networks":{"app":{"Aliases":["web1","0123456789ab","al1","al1"],"EndpointID":"e1"}}}}"#,
        )
        .unwrap();
        assert_eq!(c.short_name(), "web1");
        assert_eq!(c.labels().get("trellis.service").map(String::as_str), Some("web"));
        assert_eq!(c.aliases("app"), vec!["al1".to_string()]);
        assert!(c.aliases("other").is_empty());
        let n: NetworkInfo =
            serde_json::from_str(r#"{"Name":"app","Labels":null,"Containers":{"c1":{"EndpointID":"e1"}}}"#).unwrap();
        assert_eq!(n.containers.unwrap()["c1"].endpoint_id, "e1");
    }
}
