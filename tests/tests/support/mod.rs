//! What the end-to-end tests share: the workspace's binaries, built with the tests' profile,
//! a [`Sandbox`] that runs them as child processes in a temporary directory, logging each
//! stream to a file, bounding every wait, and killing every child when the test ends, and
//! helpers for the coordinator's commands and the bundled data that mutual-TLS tests use.

#![allow(dead_code, reason = "each test file uses its own part of the support")]

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use flate2::read::GzDecoder;
use tempfile::TempDir;

/// The bundled dataset (569 rows, 30 features, 2 classes) and its schema, under `data/`.
pub const DATASET: &str = "sklearn_breast_cancer.csv.gz";
pub const SCHEMA: &str = "breast_cancer.schema.toml";

/// The workspace's binaries.
#[derive(Debug)]
pub struct Binaries {
    /// `athanor-coordinator`.
    pub coordinator: PathBuf,
    /// `athanor-node`.
    pub node: PathBuf,
}

/// The coordinator and node binaries of this test's profile, next to this test's own
/// executable (`target/<profile>/deps/..`).
///
/// Under cargo they are built first (`cargo build --bins`, a quick no-op when they are up to
/// date): `cargo test` builds this crate and the libraries it uses, but not other packages'
/// binaries, so without it the test could run binaries older than the code under test. Run
/// directly, outside cargo, the test uses whatever binaries are there.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let test_exe = std::env::current_exe().expect("path of the test executable");
        let profile_dir = test_exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable lives in target/<profile>/deps");
        let binary =
            |name: &str| profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        let binaries = Binaries {
            coordinator: binary("athanor-coordinator"),
            node: binary("athanor-node"),
        };

        if let Some(cargo) = std::env::var_os("CARGO") {
            build_binaries(cargo, profile_dir);
        }
        for path in [&binaries.coordinator, &binaries.node] {
            assert!(
                path.is_file(),
                "{} is missing; build it with `cargo build -p athanor-coordinator -p athanor-node`",
                path.display()
            );
        }
        binaries
    })
}

/// Builds both binaries into `profile_dir` (`<target dir>/<profile>`) with its profile.
fn build_binaries(cargo: OsString, profile_dir: &Path) {
    let profile = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .expect("profile directory name");
    let target_dir = profile_dir
        .parent()
        .expect("profile directory has a parent");

    let mut build = Command::new(cargo);
    // Cargo runs tests with the package's variables set (CARGO_MANIFEST_DIR, CARGO_PKG_*).
    // Some build scripts (ring's) ask to rerun when those change, so a build that inherited
    // them would rebuild half the dependencies, and the next `cargo test` would rebuild them
    // back.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_") && name != "CARGO_HOME" {
            build.env_remove(&*name);
        }
    }
    build
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args([
            "build",
            "--bins",
            "-p",
            "athanor-coordinator",
            "-p",
            "athanor-node",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        custom => {
            build.args(["--profile", custom]);
        }
    }
    let output = build.output().expect("run cargo");
    assert!(
        output.status.success(),
        "building the binaries failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The lines of a log that are complete: the last one may still be being written.
pub fn whole_lines(log: &str) -> impl Iterator<Item = &str> {
    log.split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
}

/// One test's temporary directory and the processes it runs there.
///
/// Each child's stdout and stderr go to `<name>.stdout` and `<name>.stderr` in the directory.
/// Dropping the sandbox kills every child still running, through its handle, and, when the
/// test is failing, prints every log before the directory is deleted.
#[derive(Debug)]
pub struct Sandbox {
    children: Vec<(String, Child)>,
    dir: TempDir,
}

/// How often waits look at a process or a log again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            children: Vec::new(),
            dir: TempDir::new().expect("temporary directory"),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `command` in the directory, logging to files, with uncoloured `info` logs.
    pub fn spawn(&mut self, name: &str, mut command: Command) {
        let log = |stream: &str| {
            File::create(self.dir().join(format!("{name}.{stream}"))).expect("create log file")
        };
        command
            .current_dir(self.dir())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log("stdout"))
            .stderr(log("stderr"));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.children.push((name.to_string(), child));
    }

    pub fn child(&mut self, name: &str) -> &mut Child {
        self.children
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, child)| child)
            .unwrap_or_else(|| panic!("no process named {name}"))
    }

    pub fn log(&self, name: &str, stream: &str) -> String {
        let path = self.dir().join(format!("{name}.{stream}"));
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    pub fn is_running(&mut self, name: &str) -> bool {
        matches!(self.child(name).try_wait(), Ok(None))
    }

    /// Waits until `found` finds something in the log, failing if the process exits first or
    /// `deadline` passes.
    pub fn wait_for_log<T>(
        &mut self,
        name: &str,
        stream: &str,
        deadline: Instant,
        found: impl Fn(&str) -> Option<T>,
    ) -> T {
        loop {
            if let Some(value) = found(&self.log(name, stream)) {
                return value;
            }
            if let Ok(Some(status)) = self.child(name).try_wait() {
                panic!("{name} exited with {status} before its {stream} showed what was awaited");
            }
            assert!(
                Instant::now() < deadline,
                "{name}'s {stream} did not show what was awaited in time"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits for the process to exit, failing when `deadline` passes.
    pub fn wait_for_exit(&mut self, name: &str, deadline: Instant) -> ExitStatus {
        loop {
            match self.child(name).try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) => {}
                Err(e) => panic!("cannot wait for {name}: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "{name} is still running at the deadline"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            // Both fail only for a child that has already exited and been reaped.
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            return;
        }
        for (name, _) in &self.children {
            for stream in ["stdout", "stderr"] {
                let path = self.dir().join(format!("{name}.{stream}"));
                let text = fs::read_to_string(&path).unwrap_or_else(|e| format!("({e})"));
                eprintln!("----- {name} {stream} -----\n{text}");
            }
        }
    }
}

/// A `certs` command of the coordinator's binary.
pub fn certs(args: &[&str]) -> Command {
    let mut command = coordinator_command(&["certs"]);
    command.args(args);
    command
}

/// A command of the coordinator's binary, blind to any TLS directory set in the environment.
pub fn coordinator_command(args: &[&str]) -> Command {
    let mut command = Command::new(&binaries().coordinator);
    command.args(args).env_remove("ATHANOR_TLS_DIR");
    command
}

/// Runs `command` to completion and insists that it succeeds.
pub fn run_ok(sandbox: &mut Sandbox, name: &str, command: Command, deadline: Instant) {
    sandbox.spawn(name, command);
    let status = sandbox.wait_for_exit(name, deadline);
    assert!(
        status.success(),
        "{name} exited with {status}: {}",
        sandbox.log(name, "stderr")
    );
}

/// Starts a coordinator as process `name` and returns the address it listens on, which must
/// be on loopback.
pub fn start_coordinator(sandbox: &mut Sandbox, name: &str, args: &[&str]) -> SocketAddr {
    sandbox.spawn(name, coordinator_command(args));
    let deadline = Instant::now() + Duration::from_secs(20);
    let address = sandbox.wait_for_log(name, "stdout", deadline, |log| {
        whole_lines(log)
            .find_map(|line| line.strip_prefix("listening on "))
            .map(|address| address.trim().to_string())
    });
    let address: SocketAddr = address
        .parse()
        .expect("coordinator prints a socket address");
    assert!(
        address.ip().is_loopback(),
        "coordinator listens on {address}"
    );
    address
}

/// Splits the bundled dataset by row into `clinic-a.csv` and `clinic-b.csv` in `dir`, and
/// copies its schema there.
pub fn write_shards(dir: &Path) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let mut text = String::new();
    GzDecoder::new(File::open(data.join(DATASET)).expect("bundled dataset"))
        .read_to_string(&mut text)
        .expect("bundled dataset is gzip text");
    let mut lines = text.lines();
    let header = lines.next().expect("dataset has a header");
    let mut shards = [format!("{header}\n"), format!("{header}\n")];
    for (i, row) in lines.enumerate() {
        shards[i % 2].push_str(row);
        shards[i % 2].push('\n');
    }
    for (name, shard) in ["clinic-a", "clinic-b"].iter().zip(&shards) {
        fs::write(dir.join(format!("{name}.csv")), shard).expect("write shard");
    }
    fs::copy(data.join(SCHEMA), dir.join(SCHEMA)).expect("copy schema");
}
