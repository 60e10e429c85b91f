//! The one error type of the service core. Every front end maps its kinds to its own
//! idiom (a gRPC status, a D-Bus error name); the message is written for a person.

use std::time::Duration;

use gemmad_engine::EngineError;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The request itself is wrong; the message says what to change.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is fine but the service cannot do it in its present state (no
    /// tokenizer, a tower the checkpoint lacks).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request needs a tower (vision, audio) the model lacks or cannot load.
    #[error("{0}")]
    ModalityUnavailable(String),
    /// Too much waiting already; try again after `retry_after`.
    #[error("{message}")]
    ResourceExhausted {
        message: String,
        retry_after: Duration,
    },
    /// The service is going away (shutdown); retry when it is back.
    #[error("{0}")]
    Unavailable(String),
    /// The caller may not use the service.
    #[error("{0}")]
    PermissionDenied(String),
    /// A bug or a failure inside the service.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        ServiceError::InvalidArgument(msg.into())
    }

    /// The kind's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ServiceError::InvalidArgument(_) => "invalid_argument",
            ServiceError::FailedPrecondition(_) => "failed_precondition",
            ServiceError::ModalityUnavailable(_) => "modality_unavailable",
            ServiceError::ResourceExhausted { .. } => "resource_exhausted",
            ServiceError::Unavailable(_) => "unavailable",
            ServiceError::PermissionDenied(_) => "permission_denied",
            ServiceError::Internal(_) => "internal",
        }
    }

    /// What a request cancelled by shutdown ends with.
    pub fn shutting_down() -> Self {
        ServiceError::Unavailable(
            "gemmad is shutting down; the request was cancelled (retry when it is back)".into(),
        )
    }
}

impl From<EngineError> for ServiceError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(_)
            | EngineError::ContextFull { .. }
            | EngineError::Template(_) => ServiceError::InvalidArgument(e.to_string()),
            EngineError::Unavailable(_) => ServiceError::FailedPrecondition(e.to_string()),
            EngineError::ModalityUnavailable(_) => ServiceError::ModalityUnavailable(e.to_string()),
            _ => ServiceError::Internal(e.to_string()),
        }
    }
}
