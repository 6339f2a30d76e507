//! Child processes the demo owns: spawned with their output in a log file, killed when
//! dropped (so Ctrl-C or any error cleans up everything), and waited on until ready.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::envoy_config::Bootstrap;
use tokio::process::{Child, Command};

/// A running child process. Dropping it kills it.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `command` with stdout and stderr going to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, mut command: Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Kills the process and waits for it to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Fails with the end of the log if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited with {status}; last log lines:\n{}",
                self.name,
                self.log_tail(20)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A port on 127.0.0.1 that was free a moment ago (the OS picks; the socket is closed again).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `GET url` until it answers 200 with a body containing `expect`, the process dies, or
/// `timeout` passes.
pub async fn wait_ready(
    process: &mut Process,
    url: &str,
    expect: &str,
    timeout: Duration,
) -> Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let deadline = Instant::now() + timeout;
    loop {
        process.check_running()?;
        if let Ok(response) = client.get(url).send().await
            && response.status().is_success()
            && response
                .text()
                .await
                .is_ok_and(|body| body.contains(expect))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} was not ready at {url} within {timeout:?}; last log lines:\n{}",
                process.name,
                process.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `bootstrap` to `<log_dir>/<name>.json`, starts Envoy with it and `workers` worker
/// threads, and waits until its admin listener says LIVE.
pub async fn start_envoy(
    binary: &Path,
    name: &str,
    bootstrap: &Bootstrap,
    workers: u32,
    log_level: &str,
    log_dir: &Path,
) -> Result<Process> {
    let bootstrap_path = log_dir.join(format!("{name}.json"));
    std::fs::write(
        &bootstrap_path,
        serde_json::to_vec_pretty(&bootstrap.to_json())?,
    )?;
    let mut command = Command::new(binary);
    command.arg("-c").arg(&bootstrap_path).args([
        "--concurrency",
        &workers.to_string(),
        "--use-dynamic-base-id",
        "-l",
        log_level,
    ]);
    let mut envoy = Process::spawn(name, command, log_dir)?;
    let admin = loopback(bootstrap.admin_port);
    wait_ready(
        &mut envoy,
        &format!("http://{admin}/ready"),
        "LIVE",
        Duration::from_secs(30),
    )
    .await?;
    Ok(envoy)
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
