//! Running the `outboxd` binary the way an operator does: `outboxd -c <config> …`, with the
//! test process's `DATABASE_URL` and `RUST_LOG` removed so only the config speaks.

use std::path::Path;
use std::process::Command;

/// `outboxd -c <main>`, ready for more arguments.
pub fn outboxd(main: &Path) -> Command {
    let mut c = bare();
    c.arg("-c").arg(main);
    c
}

/// `outboxd` without a config argument (for `--help`, defaults and config errors).
pub fn bare() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    c.env_remove("DATABASE_URL").env_remove("RUST_LOG");
    c
}

/// Runs the command to its end: (exit status success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
