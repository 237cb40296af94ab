//! `scripts/`: what they check before they build anything. (The PGO build
//! itself takes two fat-LTO builds, about ten minutes; it is run and
//! measured by hand, see docs/performance.md.)

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn rustc_llvm_major() -> String {
    let out = Command::new("rustc").arg("-vV").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .unwrap_or_else(|| panic!("no LLVM version in rustc -vV: {text}"))
        .to_owned()
}

/// A profile merged by another LLVM than rustc's would not load (or, worse,
/// half load): the script refuses such an `llvm-profdata` up front, says
/// which versions differ, and builds nothing.
#[test]
fn pgo_build_refuses_an_llvm_profdata_of_another_llvm_version() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("llvm-profdata");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'LLVM (http://llvm.org/):'\necho '  LLVM version 1.0.0'\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg("scripts/pgo-build.sh")
        .current_dir(root)
        .env("LLVM_PROFDATA", &fake)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let expected = format!("is LLVM 1; rustc uses LLVM {}", rustc_llvm_major());
    assert!(err.contains(&expected), "{err}");
    assert!(
        !err.contains("1/4"),
        "it went on to build after refusing: {err}"
    );
}
