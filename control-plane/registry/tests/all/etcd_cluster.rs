//! A real etcd cluster on loopback for tests and benches: reserved ports, a temporary data
//! directory per member, members killed on drop, every wait bounded.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result};
use fulcrum_test_support::Process;

/// How long a cluster or a restarted member may take to serve.
const READY_WITHIN: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<Process>,
}

/// A running cluster. See the module docs.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: tempfile::TempDir,
}

/// etcd cannot bind port 0 and report it: ports reserved outside the kernel's ephemeral range
/// (see [`fulcrum_test_support::reserve_port`]), so no other socket takes one first.
fn reserved_port() -> Result<u16> {
    Ok(fulcrum_test_support::reserve_port()?)
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one serves. Fails with the reason when
    /// the `etcd` binary is missing (`apt-get install etcd-server`, or `cargo xtask setup`).
    pub async fn start(size: usize) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut members = Vec::new();
        for index in 0..size {
            let name = format!("m{index}");
            members.push(Member {
                data_dir: dir.path().join(&name),
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port: reserved_port()?,
                peer_port: reserved_port()?,
                process: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            _dir: dir,
        };
        for index in 0..size {
            cluster.spawn(index, "new")?;
        }
        for index in 0..size {
            cluster.wait_ready(index).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, index: usize, state: &str) -> Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let member = &mut self.members[index];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new("etcd");
        command
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "fulcrum-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"]);
        let process = Process::spawn(&format!("etcd member {index}"), &mut command, &member.log)
            .context(
                "starting `etcd` (install it: apt-get install etcd-server, or cargo xtask setup)",
            )?;
        member.process = Some(process);
        Ok(())
    }

    async fn wait_ready(&mut self, index: usize) -> Result<()> {
        let url = format!(
            "http://127.0.0.1:{}/health",
            self.members[index].client_port
        );
        let process = self.members[index]
            .process
            .as_mut()
            .context("the member is not running")?;
        Ok(process
            .wait_until_serving(&url, "true", READY_WITHIN)
            .await?)
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Kills member `index` (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut process) = self.members[index].process.take() {
            process.kill();
        }
    }

    /// Restarts a killed member on its data directory and waits until the cluster serves
    /// through it.
    pub async fn restart(&mut self, index: usize) -> Result<()> {
        self.spawn(index, "existing")?;
        self.wait_ready(index).await
    }
}
