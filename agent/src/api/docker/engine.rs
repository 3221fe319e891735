//! The Docker engine's API, read-only: where the Docker driver learns what
//! the plugin protocol leaves out (network names, container names, aliases,
//! labels and health), and its event stream (health changes). HTTP/1.1 over
//! the engine's unix socket.

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
    #[serde(rename = "State", default)]
    pub state: Option<ContainerState>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContainerState {
    /// Only with a HEALTHCHECK.
    #[serde(rename = "Health", default)]
    pub health: Option<Health>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Health {
    /// `starting`, `healthy`, `unhealthy` (or `none`).
    #[serde(rename = "Status", default)]
    pub status: String,
}

/// Is a container whose health is `status` ready for clients? Healthy, or
/// without a health check; not while `starting` nor `unhealthy`.
pub fn ready_for(status: Option<&str>) -> bool {
    !matches!(status, Some("starting") | Some("unhealthy"))
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
    /// Ready for clients: healthy, or without a HEALTHCHECK.
    pub fn ready(&self) -> bool {
        ready_for(self.state.as_ref().and_then(|s| s.health.as_ref()).map(|h| h.status.as_str()))
    }

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

/// One event of the engine's stream (`GET /events`), as much of it as the
/// driver reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Event {
    #[serde(rename = "Type", default)]
    pub kind: String,
    /// E.g. `health_status: healthy`.
    #[serde(rename = "Action", default)]
    pub action: String,
    #[serde(rename = "Actor", default)]
    pub actor: Option<Actor>,
    /// The older fields, for engines that fill only those.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub id: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Actor {
    #[serde(rename = "ID", default)]
    pub id: String,
}

impl Event {
    /// A container's new health: its id and status (`healthy`,
    /// `unhealthy`, `starting`), if this is a health event.
    pub fn health(&self) -> Option<(&str, &str)> {
        let action = if self.action.is_empty() { &self.status } else { &self.action };
        let status = action.strip_prefix("health_status:")?.trim();
        let id = self.actor.as_ref().map(|a| a.id.as_str()).filter(|i| !i.is_empty()).unwrap_or(&self.id);
        (!id.is_empty() && (self.kind.is_empty() || self.kind == "container")).then_some((id, status))
    }
}

/// The query of the event stream the driver follows: containers' health
/// changes (`{"type":["container"],"event":["health_status"]}`; the engine
/// matches `health_status` to every `health_status: …` action).
pub const HEALTH_EVENTS: &str =
    "/events?filters=%7B%22type%22%3A%5B%22container%22%5D%2C%22event%22%3A%5B%22health_status%22%5D%7D";

/// The engine's event stream, open: one JSON object a line.
pub struct Events {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    path: String,
}

impl Events {
    /// The next event (`None`: the engine closed the stream). Lines that
    /// are not events are skipped.
    pub async fn next(&mut self) -> Result<Option<Event>, EngineError> {
        loop {
            if let Some(line) = take_line(&mut self.buf) {
                match serde_json::from_slice::<Event>(&line) {
                    Ok(ev) => return Ok(Some(ev)),
                    Err(e) => {
                        tracing::debug!(error = %e, line = %String::from_utf8_lossy(&line), "an engine event that does not parse");
                        continue;
                    }
                }
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(EngineError::Http { path: self.path.clone(), msg: e.to_string() }),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// The first complete, non-empty line of `buf`, taken out of it.
pub fn take_line(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        let end = buf.iter().position(|b| *b == b'\n')?;
        let line: Vec<u8> = buf.drain(..=end).take(end).collect();
        if !line.iter().all(u8::is_ascii_whitespace) {
            return Some(line);
        }
    }
}

impl Engine {
    /// A GET's response, headers read (the body may be a stream).
    async fn send(&self, path: &str) -> Result<hyper::Response<hyper::body::Incoming>, EngineError> {
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
        tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| EngineError::Http { path: path.to_string(), msg: "no answer in 10 s".into() })?
            .map_err(|e| EngineError::Http { path: path.to_string(), msg: e.to_string() })
    }

    /// Follow the event stream at `path` (e.g. [`HEALTH_EVENTS`]): once
    /// this returns, the engine is sending every event from now on.
    pub async fn events(&self, path: &str) -> Result<Events, EngineError> {
        let resp = self.send(path).await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(EngineError::Http {
                path: path.to_string(),
                msg: format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
            });
        }
        Ok(Events { body: resp.into_body(), buf: Vec::new(), path: path.to_string() })
    }

    async fn get<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, EngineError> {
        let resp = self.send(path).await?;
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

    #[test]
    fn readiness_from_inspect_follows_the_health_check() {
        let with = |state: &str| -> bool {
            serde_json::from_str::<ContainerInfo>(&format!(r#"{{"Id":"c","State":{state}}}"#)).unwrap().ready()
        };
        assert!(with(r#"{"Status":"running","Running":true}"#), "no HEALTHCHECK: ready");
        assert!(with(r#"{"Health":{"Status":"healthy","FailingStreak":0}}"#));
        assert!(!with(r#"{"Health":{"Status":"starting"}}"#), "not before its first passing check");
        assert!(!with(r#"{"Health":{"Status":"unhealthy","FailingStreak":3}}"#));
        assert!(serde_json::from_str::<ContainerInfo>(r#"{"Id":"c"}"#).unwrap().ready());
    }

    #[test]
    fn health_events_as_dockerd_20_10_sends_them() {
        let ev: Event = serde_json::from_str(
            r#"{"status":"health_status: unhealthy","id":"abc","from":"trellis-busybox","Type":"container",
                "Action":"health_status: unhealthy","Actor":{"ID":"abc","Attributes":{"image":"trellis-busybox","name":"web"}},
                "scope":"local","time":1700000000,"timeNano":1700000000000000000}"#,
        )
        .unwrap();
        assert_eq!(ev.health(), Some(("abc", "unhealthy")));
        let old: Event = serde_json::from_str(r#"{"status":"health_status: healthy","id":"abc"}"#).unwrap();
        assert_eq!(old.health(), Some(("abc", "healthy")));
        for other in [
            r#"{"Type":"container","Action":"start","Actor":{"ID":"abc"}}"#,
            r#"{"Type":"network","Action":"health_status: healthy"}"#,
        ] {
            assert_eq!(serde_json::from_str::<Event>(other).unwrap().health(), None, "{other}");
        }
        // The stream: one object a line, split anywhere by the transport.
        let mut buf = b"{\"a\":1}\n\n{\"b\"".to_vec();
        assert_eq!(take_line(&mut buf), Some(b"{\"a\":1}".to_vec()));
        assert_eq!(take_line(&mut buf), None, "an incomplete line waits");
        buf.extend_from_slice(b":2}\n");
        assert_eq!(take_line(&mut buf), Some(b"{\"b\":2}".to_vec()));
        assert!(buf.is_empty());
    }

    #[test]
    fn the_health_filter_is_the_json_docker_expects() {
        let q = HEALTH_EVENTS.strip_prefix("/events?filters=").unwrap();
        let mut out = Vec::new();
        let b = q.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"type": ["container"], "event": ["health_status"]}));
    }
}
