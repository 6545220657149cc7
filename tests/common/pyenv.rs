//! Python virtual environments for the tests that drive real Python tools
//! (the `openai` and `webuiapi` clients, schemathesis): made once under
//! `target/NAME` (python3 -m venv, then pip install of a pinned requirements
//! file from tests/data; PyPI is needed the first time) and remade when that
//! file changes, which a copy of it kept in the venv (the stamp) tells.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use super::EXE;

/// The python of venv `target/NAME` holding tests/data/REQUIREMENTS, made or
/// remade first when needed (once per test binary; callers wait on each other).
pub fn python(name: &str, requirements: &str) -> PathBuf {
    static VENVS: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut guard = VENVS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = guard.get_or_insert_with(HashMap::new).get(name) {
        return p.clone();
    }
    let target = Path::new(EXE).parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let venv = target.join(name);
    let py = venv.join("bin").join("python");
    let reqs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(requirements);
    let wanted = std::fs::read_to_string(&reqs).unwrap_or_else(|e| panic!("{}: {e}", reqs.display()));
    let stamp = venv.join(requirements);
    if !py.exists() || std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&venv);
        let run = |cmd: &mut Command, what: &str| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e} (is python3 installed?)"));
            assert!(
                out.status.success(),
                "{what} failed (python3-venv and network access to PyPI are needed):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv");
        run(
            Command::new(&py).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"]).arg(&reqs),
            &format!("pip install -r tests/data/{requirements}"),
        );
        std::fs::write(&stamp, &wanted).unwrap();
    }
    guard.get_or_insert_with(HashMap::new).insert(name.to_string(), py.clone());
    py
}
