//! The reference receiver (`outboxd receive`). Placeholder until the receiver lands.
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    pub dir: PathBuf,
    pub token_file: PathBuf,
    pub path: String,
    pub max_body_bytes: u64,
    pub file_field: String,
    pub session_field: String,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            dir: PathBuf::new(),
            token_file: PathBuf::new(),
            path: "/upload".into(),
            max_body_bytes: 8 << 30,
            file_field: "file".into(),
            session_field: "session_id".into(),
        }
    }
}

pub async fn serve(
    _listener: tokio::net::TcpListener,
    _options: ReceiverOptions,
    _shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::bail!("the receiver is not built yet")
}
