//! CNI error results: the well-known codes and the JSON the runtime reads.

use serde_json::Value;

/// Well-known codes (0-99) and this plugin's own (100+).
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const BAD_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const BAD_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const STATUS_CANNOT_ADD: u32 = 50;
    pub const STATUS_LIMITED: u32 = 51;
    /// The agent refused the request (already attached, not attachable, …).
    pub const REFUSED: u32 = 100;
    /// CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 101;
    /// The agent failed internally.
    pub const AGENT_FAILED: u32 = 102;
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The error result printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = serde_json::json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }

    /// An agent's gRPC answer as a CNI error: unavailable means "try again
    /// later" (11), bad input "invalid network config" (7).
    pub fn from_status(what: &str, s: &tonic::Status) -> CniError {
        use tonic::Code;
        let code = match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted => codes::TRY_AGAIN_LATER,
            Code::InvalidArgument | Code::NotFound => codes::BAD_CONFIG,
            Code::AlreadyExists | Code::FailedPrecondition | Code::PermissionDenied => codes::REFUSED,
            _ => codes::AGENT_FAILED,
        };
        CniError::new(code, format!("{what}: {}", s.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_answers_map_to_well_known_codes() {
        let e = CniError::from_status("attach", &tonic::Status::unavailable("store unavailable: etcd down"));
        assert_eq!(e.code, codes::TRY_AGAIN_LATER);
        assert!(e.msg.contains("store unavailable"));
        assert_eq!(CniError::from_status("x", &tonic::Status::not_found("network")).code, codes::BAD_CONFIG);
        assert_eq!(CniError::from_status("x", &tonic::Status::already_exists("dup")).code, codes::REFUSED);
        assert_eq!(CniError::from_status("x", &tonic::Status::internal("boom")).code, codes::AGENT_FAILED);
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let v = CniError::new(codes::BAD_ENV, "CNI_IFNAME missing").with_details("d").to_json("1.1.0");
        assert_eq!(v, serde_json::json!({"cniVersion":"1.1.0","code":4,"msg":"CNI_IFNAME missing","details":"d"}));
        let v = CniError::new(codes::IO, "x").to_json("1.0.0");
        assert!(v.get("details").is_none());
    }
}
