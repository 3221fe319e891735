//! Connecting to `trellisd` over its unix socket, with errors that say
//! what to do.

use std::path::{Path, PathBuf};

use crate::proto::agent_client::AgentClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach trellisd at {0}: the socket does not exist (is trellisd running? start it with `trellisd`)")]
    Missing(PathBuf),
    #[error("permission denied on {0}: the agent's socket is root-only, run trellisctl as root")]
    Denied(PathBuf),
    #[error("cannot reach trellisd at {0}: connection refused (trellisd is not running; a stale socket is left)")]
    Refused(PathBuf),
    #[error("cannot reach trellisd at {path}: {source}")]
    Other { path: PathBuf, source: std::io::Error },
}

pub async fn connect(path: &Path) -> Result<AgentClient<Channel>, ConnectError> {
    // Probe first, so the error names the cause rather than a transport error.
    if let Err(e) = tokio::net::UnixStream::connect(path).await {
        let p = path.to_path_buf();
        return Err(match e.kind() {
            std::io::ErrorKind::NotFound => ConnectError::Missing(p),
            std::io::ErrorKind::PermissionDenied => ConnectError::Denied(p),
            std::io::ErrorKind::ConnectionRefused => ConnectError::Refused(p),
            _ => ConnectError::Other { path: p, source: e },
        });
    }
    let owned = path.to_path_buf();
    let channel = Endpoint::from_static("http://trellisd.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = owned.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
        }))
        .await
        .map_err(|e| ConnectError::Other { path: path.to_path_buf(), source: std::io::Error::other(e) })?;
    Ok(AgentClient::new(channel))
}
