//! Counting the instructions a process executes per request, with valgrind's callgrind:
//! a measure this machine's noise cannot move.
//!
//! The data-path bench's CPU per request moves 20-50 % between repeats on a shared virtual
//! machine, which hides the few-percent differences issues #16 and #18 ask about. Instructions
//! do not move: the same binary, configuration and requests execute the same instructions
//! whatever the neighbours do. [`Callgrind::launcher`] starts Envoy under callgrind with
//! instrumentation off (startup and warm-up run at a fraction of native speed instead of
//! 1/50th); [`Callgrind::measure`] switches it on around one measured load and dumps the
//! counts, which [`Counts::parse`] reads: the total and the share of each object (Envoy, libc,
//! the native module), since the dump attributes every instruction to the function and object
//! it ran in. Code in no file is `???`: V8's generated code, and also Envoy's own, which it
//! copies out of its executable into anonymous memory at startup (so `???` is not V8's share).
//!
//! What it counts: user-space instructions of every thread of the process. It does not count
//! the kernel's work (the sockets' system calls), so a difference in instructions is a larger
//! share of the user-space count than of the CPU time; and it counts instructions, not
//! cycles (cache misses are not in it). It complements the CPU time, it does not replace it.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// How Envoy runs under callgrind and how its counts are read back.
#[derive(Debug, Clone)]
pub struct Callgrind {
    /// The `valgrind` launcher.
    pub valgrind: PathBuf,
    /// `callgrind_control`, which switches a running callgrind's instrumentation and dumps.
    pub control: PathBuf,
}

impl Callgrind {
    /// The command prefix that runs a program under callgrind, instrumentation off until
    /// [`Callgrind::measure`] switches it on, dumps named `<prefix>.<pid>[.<n>]`.
    pub fn launcher(&self, dumps: &Path) -> Vec<OsString> {
        let mut out_file = OsString::from("--callgrind-out-file=");
        out_file.push(dumps);
        out_file.push(".%p");
        vec![
            self.valgrind.clone().into_os_string(),
            "--tool=callgrind".into(),
            "--instr-atstart=no".into(),
            // V8 writes the code it generates and runs it: checked for changes, as valgrind
            // does by default for code outside files.
            "--smc-check=all-non-file".into(),
            out_file,
        ]
    }

    /// Counts what process `pid` (running under [`Callgrind::launcher`] with `dumps`)
    /// executes while `load` runs: instrumentation on, the load, a dump, instrumentation
    /// off. Returns the load's result and the counts of the dump.
    pub async fn measure<T>(
        &self,
        pid: u32,
        dumps: &Path,
        load: impl Future<Output = Result<T>>,
    ) -> Result<(T, Counts)> {
        let before = dump_files(dumps, pid)?;
        self.control(pid, &["--instr=on"]).await?;
        let loaded = load.await;
        self.control(pid, &["--dump"]).await?;
        self.control(pid, &["--instr=off"]).await?;
        let loaded = loaded?;
        let after = dump_files(dumps, pid)?;
        let Some(dump) = after.into_iter().find(|file| !before.contains(file)) else {
            bail!(
                "callgrind wrote no new dump for process {pid} next to {}",
                dumps.display()
            );
        };
        let text = std::fs::read_to_string(&dump)
            .with_context(|| format!("reading {}", dump.display()))?;
        let counts = Counts::parse(&text).with_context(|| format!("in {}", dump.display()))?;
        Ok((loaded, counts))
    }

    async fn control(&self, pid: u32, arguments: &[&str]) -> Result<()> {
        let output = Command::new(&self.control)
            .args(arguments)
            .arg(pid.to_string())
            .output()
            .await
            .with_context(|| format!("running {}", self.control.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || text.contains("Error") {
            bail!(
                "{} {} {pid} failed: {}{}",
                self.control.display(),
                arguments.join(" "),
                text.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

/// The dumps process `pid` has written so far: `<dumps>.<pid>` and `<dumps>.<pid>.<n>`.
fn dump_files(dumps: &Path, pid: u32) -> Result<Vec<PathBuf>> {
    let directory = dumps.parent().context("the dump prefix has no directory")?;
    let prefix = format!(
        "{}.{pid}",
        dumps
            .file_name()
            .context("the dump prefix has no file name")?
            .to_string_lossy()
    );
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(directory).with_context(|| format!("listing {}", directory.display()))?
    {
        let path = entry?.path();
        let name = path.file_name().map(|name| name.to_string_lossy());
        if name.is_some_and(|name| {
            name == prefix.as_str()
                || name
                    .strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        }) {
            files.push(path);
        }
    }
    Ok(files)
}

/// What one callgrind dump counted: instructions executed (`Ir`), in all and per object
/// (the executable or a shared library; `???` for code in no file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Instructions executed in all (the dump's `totals:`).
    pub total: u64,
    /// Instructions executed in each object's own functions (self cost, not inclusive).
    pub by_object: BTreeMap<String, u64>,
}

impl Counts {
    /// Reads a callgrind dump (format version 1, event `Ir` first): the `totals:` line, and
    /// every cost line attributed to the object of the function it belongs to (an object's
    /// compressed name may be given first as a callee's, `cob=`). A cost line
    /// right after `calls=` is the inclusive cost of a call, already counted in the callee,
    /// and is skipped. The objects' sum must equal the total, else the dump was not read
    /// right and it is an error.
    pub fn parse(text: &str) -> Result<Self> {
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        let mut by_object: BTreeMap<String, u64> = BTreeMap::new();
        let mut object = String::from("???");
        let mut total = None;
        let mut after_calls = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("ob=") {
                object = compressed_name(&mut names, rest);
                continue;
            }
            if let Some(rest) = line.strip_prefix("cob=") {
                // A callee's object: it may be where an object's name is first given.
                compressed_name(&mut names, rest);
                continue;
            }
            if let Some(rest) = line.strip_prefix("totals:") {
                total = Some(first_number(rest).context("`totals:` without a number")?);
                continue;
            }
            if line.starts_with("calls=") {
                after_calls = true;
                continue;
            }
            let first = line.bytes().next();
            let is_cost = first.is_some_and(|b| b.is_ascii_digit() || b"+-*".contains(&b));
            if !is_cost {
                continue;
            }
            if std::mem::take(&mut after_calls) {
                continue;
            }
            // `<position> <Ir> [<other events>]`; a missing event counts 0.
            let instructions = line
                .split_whitespace()
                .nth(1)
                .map(str::parse::<u64>)
                .transpose()
                .with_context(|| format!("a cost line that is not numbers: {line:?}"))?
                .unwrap_or(0);
            *by_object.entry(object.clone()).or_default() += instructions;
        }
        let total = total.context("the dump has no `totals:` line")?;
        let summed: u64 = by_object.values().sum();
        if summed != total {
            bail!("the objects' instructions add up to {summed}, the dump's total is {total}");
        }
        Ok(Self { total, by_object })
    }

    /// Instructions executed in objects whose path ends with `file_name`.
    pub fn in_object(&self, file_name: &str) -> u64 {
        self.by_object
            .iter()
            .filter(|(object, _)| object.ends_with(file_name))
            .map(|(_, count)| count)
            .sum()
    }
}

/// Callgrind's name compression: `(id) name` defines id, `(id)` refers back to it.
fn compressed_name(names: &mut BTreeMap<String, String>, field: &str) -> String {
    let Some(rest) = field.strip_prefix('(') else {
        return field.to_owned();
    };
    let Some((id, name)) = rest.split_once(')') else {
        return field.to_owned();
    };
    let name = name.trim();
    if name.is_empty() {
        names.get(id).cloned().unwrap_or_else(|| field.to_owned())
    } else {
        names.insert(id.to_owned(), name.to_owned());
        name.to_owned()
    }
}

fn first_number(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dump as callgrind writes it: compressed names, a call's inclusive cost after its
    /// `calls=` line, relative positions.
    const DUMP: &str = "\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4345
cmd:  envoy
part: 1

positions: line
events: Ir
summary: 1110

ob=(1) /usr/bin/envoy
fl=(1) ???
fn=(1) 0x000000000412
0 100
+2 50
cob=(2) /opt/libfulcrum_native.so
cfi=(2) ???
cfn=(2) choose_host
calls=3 0
0 900
ob=(2)
fl=(2)
fn=(2)
0 600
* 300
ob=(3) ???
fl=(1)
fn=(3) 0x0000000000001
0 60
ob=(1)
fn=(1)
0 0

totals: 1110
";

    #[test]
    fn a_dump_is_read_as_each_objects_own_instructions_skipping_the_inclusive_cost_of_calls() {
        let counts = Counts::parse(DUMP).unwrap();
        assert_eq!(counts.total, 1110);
        assert_eq!(counts.by_object["/usr/bin/envoy"], 150);
        assert_eq!(counts.by_object["/opt/libfulcrum_native.so"], 900);
        assert_eq!(counts.by_object["???"], 60);
        assert_eq!(counts.in_object("libfulcrum_native.so"), 900);
        assert_eq!(counts.in_object("libnothing.so"), 0);
    }

    #[test]
    fn a_dump_whose_objects_do_not_add_up_to_its_total_is_refused() {
        let wrong = DUMP.replace("totals: 1110", "totals: 1111");
        let error = Counts::parse(&wrong).unwrap_err().to_string();
        assert!(error.contains("add up to 1110"), "{error}");
        assert!(Counts::parse("events: Ir\n0 5\n").is_err());
    }

    #[test]
    fn the_launcher_starts_with_instrumentation_off_and_names_dumps_by_process() {
        let callgrind = Callgrind {
            valgrind: "valgrind".into(),
            control: "callgrind_control".into(),
        };
        let launcher = callgrind.launcher(Path::new("/tmp/x/envoy.callgrind"));
        assert_eq!(launcher[0], "valgrind");
        assert!(launcher.contains(&"--instr-atstart=no".into()));
        assert!(launcher.contains(&"--callgrind-out-file=/tmp/x/envoy.callgrind.%p".into()));
    }

    /// Real valgrind (`cargo xtask setup` installs it): a shell counting to a bound under
    /// the launcher executes nothing counted until measured, then its own instructions.
    #[tokio::test]
    async fn a_program_under_the_launcher_is_counted_while_measured_in_its_own_object() {
        let dir = tempfile::tempdir().unwrap();
        let dumps = dir.path().join("sh.callgrind");
        let callgrind = Callgrind {
            valgrind: "valgrind".into(),
            control: "callgrind_control".into(),
        };
        let launcher = callgrind.launcher(&dumps);
        let shell = std::fs::canonicalize("/bin/sh").unwrap();
        let mut child = Command::new(&launcher[0])
            .args(&launcher[1..])
            .args(["--quiet", "/bin/sh", "-c"])
            .arg("i=0; while [ $i -lt 20000000 ]; do i=$((i+1)); done")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        // callgrind answers its control once it has started the program.
        let started = std::time::Instant::now();
        while callgrind.control(pid, &[]).await.is_err() {
            assert!(started.elapsed() < std::time::Duration::from_secs(20));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let load = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            Ok(7)
        };
        let (value, counts) = callgrind.measure(pid, &dumps, load).await.unwrap();
        child.kill().await.unwrap();
        assert_eq!(value, 7);
        assert!(counts.total > 100_000, "{counts:?}");
        let file_name = shell.file_name().unwrap().to_string_lossy();
        assert!(counts.in_object(&file_name) > 0, "{counts:?}");
    }

    #[test]
    fn only_the_processs_own_dumps_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "e.cg.7",
            "e.cg.7.1",
            "e.cg.7.12",
            "e.cg.71",
            "e.cg.7.x",
            "other.7",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let mut found: Vec<String> = dump_files(&dir.path().join("e.cg"), 7)
            .unwrap()
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        found.sort();
        assert_eq!(found, ["e.cg.7", "e.cg.7.1", "e.cg.7.12"]);
    }
}
