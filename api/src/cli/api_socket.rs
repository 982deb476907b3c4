//! `--api-socket` and `--api-socket-group`: where a VM's control API is served, and who may use it.

use std::path::PathBuf;

use clap::Args;

use crate::server::{group_id, ApiSocket, ServerError};

/// The VM's control API socket.
#[derive(Args, Debug, Default)]
pub struct ApiSocketArgs {
    /// Serve the VM's control API (JSON over HTTP) on this Unix socket; see `ftvmm vm --help`. It
    /// is created 0600 (only this user may use it) and never replaces a socket another live
    /// process serves.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Let members of this group (a name or a number) use the API socket too: it is then created
    /// 0660 and owned by that group.
    #[arg(long, value_name = "GROUP", requires = "api_socket")]
    pub api_socket_group: Option<String>,
}

impl ApiSocketArgs {
    /// The socket asked for, if any, with its group resolved.
    pub fn socket(&self) -> Result<Option<ApiSocket>, ServerError> {
        let Some(path) = &self.api_socket else {
            return Ok(None);
        };
        let group = self.api_socket_group.as_deref().map(group_id).transpose()?;
        Ok(Some(ApiSocket {
            path: path.clone(),
            group,
        }))
    }
}
