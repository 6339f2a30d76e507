//! A child process owned by a test or the demo: its stdout and stderr appended to a log file,
//! killed when the guard is dropped (so a failed assertion, an error or Ctrl-C cleans up
//! everything), and never silent about why it failed — the tail of its log is printed when
//! the guard is dropped during a panic and is part of every error about it.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use crate::{
    Error,
    error::io,
    eventually::{Ready, poll_until},
};

/// Lines of a log printed on a panic and carried by errors.
pub(crate) const LOG_TAIL_LINES: usize = 40;

/// A running child process; dropping it kills it.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `command` as `name`, with stdin closed and stdout and stderr appended to `log`
    /// (created if missing: a restarted process keeps adding to the same log).
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("opening {}", log.display())))?;
        let stderr = file
            .try_clone()
            .map_err(io(format!("sharing {}", log.display())))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(io(format!("starting {name} ({command:?})")))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// The name it was started as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails with [`Error::Exited`] (status and log tail) if the process has exited.
    pub fn check_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(self.exited(status)),
            Ok(None) => Ok(()),
            Err(source) => Err(Error::Io {
                what: format!("checking on {}", self.name),
                source,
            }),
        }
    }

    /// Polls `check` as [`eventually`](crate::eventually()) does while the process runs: fails
    /// at once with [`Error::Exited`] if it exits, and with [`Error::NotReady`] naming `what`
    /// (and the log's tail) after `within`.
    pub async fn wait_for<R, F, Fut>(
        &mut self,
        within: Duration,
        what: &str,
        check: F,
    ) -> Result<R::Value, Error>
    where
        R: Ready,
        F: FnMut() -> Fut,
        Fut: Future<Output = R>,
    {
        let result = poll_until(within, what, || self.check_running(), check).await;
        result.map_err(|error| match error {
            Error::Timeout { what, within } => Error::NotReady {
                name: self.name.clone(),
                reason: format!("not within {within:?}: {what}"),
                log: self.log.clone(),
                tail: self.log_tail(LOG_TAIL_LINES),
            },
            other => other,
        })
    }

    /// Waits until `GET url` answers 2xx with a body containing `expect` (`""`: any body).
    pub async fn wait_until_serving(
        &mut self,
        url: &str,
        expect: &str,
        within: Duration,
    ) -> Result<(), Error> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(1))
            .build()
            .map_err(|source| Error::Http {
                url: url.to_owned(),
                source,
            })?;
        let what = format!("GET {url} answers 2xx with {expect:?} in its body");
        self.wait_for(within, &what, || async {
            match client.get(url).send().await {
                Ok(response) if response.status().is_success() => response
                    .text()
                    .await
                    .is_ok_and(|body| body.contains(expect)),
                _ => false,
            }
        })
        .await
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit; returns how it exited.
    pub async fn terminate(&mut self, within: Duration) -> Result<ExitStatus, Error> {
        let signalled = Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .map_err(io(format!("sending SIGTERM to {}", self.name)))?;
        if !signalled.success() {
            return Err(Error::Io {
                what: format!("kill -TERM {} ({}): {signalled}", self.id(), self.name),
                source: std::io::Error::other("kill failed"),
            });
        }
        let what = format!("{} exits after SIGTERM", self.name);
        let child = &mut self.child;
        crate::eventually(within, &what, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await
    }

    /// Kills the process (SIGKILL) and reaps it; nothing happens if it already exited.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // It may exit between the check and the kill; there is nothing else to do then.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn exited(&self, status: ExitStatus) -> Error {
        Error::Exited {
            name: self.name.clone(),
            status,
            log: self.log.clone(),
            tail: self.log_tail(LOG_TAIL_LINES),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- tail of {} ({}) ---\n{}",
                self.log.display(),
                self.name,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[tokio::test]
    async fn an_exited_process_is_reported_with_its_status_and_log_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("quits.log");
        let mut process = Process::spawn(
            "quits",
            &mut shell("echo first; echo last >&2; exit 3"),
            &log,
        )
        .expect("sh starts");
        let error = process
            .wait_for(Duration::from_secs(10), "never", || async { false })
            .await
            .expect_err("it exits");
        let Error::Exited {
            name, status, tail, ..
        } = error
        else {
            panic!("not an exit: {error}");
        };
        assert_eq!((name.as_str(), status.code()), ("quits", Some(3)));
        assert_eq!(tail, "first\nlast");
    }

    #[tokio::test]
    async fn a_process_not_ready_in_time_is_reported_with_its_log_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("sleeps.log");
        let mut process = Process::spawn("sleeps", &mut shell("echo waiting; sleep 30"), &log)
            .expect("sh starts");
        let error = process
            .wait_for(Duration::from_millis(300), "a miracle", || async { false })
            .await
            .expect_err("never ready");
        let message = error.to_string();
        assert!(message.contains("sleeps did not become ready"), "{message}");
        assert!(message.contains("a miracle"), "{message}");
        assert!(message.ends_with("waiting"), "{message}");
    }

    #[tokio::test]
    async fn terminate_returns_the_exit_status_and_drop_kills() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("trap.log");
        let mut graceful = Process::spawn(
            "graceful",
            &mut shell("trap 'exit 0' TERM; while true; do sleep 0.05; done"),
            &log,
        )
        .expect("sh starts");
        // Give the shell time to install its trap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = graceful
            .terminate(Duration::from_secs(10))
            .await
            .expect("exits on SIGTERM");
        assert!(status.success(), "{status}");

        let stubborn = Process::spawn("stubborn", &mut shell("sleep 30"), &log).expect("starts");
        let pid = stubborn.id();
        drop(stubborn);
        let alive = Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .expect("kill -0");
        assert!(!alive.success(), "process {pid} survived its guard");
    }
}
