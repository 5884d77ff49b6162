//! Host packaging: `scripts/install-host` into a staging root (the tree, the modes, settings
//! never overwritten, uninstalling), and `systemd-analyze verify` on the units it installs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use baker_tests::{require, Needs};

const PROGRAMS: [&str; 4] = [
    "baker-directory",
    "baker-registrar",
    "baker-ambassador",
    "baker",
];
const DAEMONS: [&str; 3] = ["directory", "registrar", "ambassador"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

/// Small executables standing in for the binaries: the tree and the units are under test
/// here, not the programs, and copies of the debug builds would take hundreds of megabytes.
fn stub_binaries(dir: &Path) -> PathBuf {
    let bin = dir.join("built");
    std::fs::create_dir_all(&bin).unwrap();
    for p in PROGRAMS {
        let path = bin.join(p);
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

fn install_host(args: &[&str]) -> Output {
    let out = Command::new(workspace().join("scripts/install-host"))
        .args(args)
        .env_remove("DESTDIR")
        .output()
        .expect("running scripts/install-host");
    assert!(
        out.status.success(),
        "scripts/install-host {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn install_host_stages_the_tree_keeps_settings_and_uninstalls() {
    let tmp = tempfile::tempdir().unwrap();
    let built = stub_binaries(tmp.path());
    let root = tmp.path().join("root");
    let (root_s, built_s) = (root.to_str().unwrap(), built.to_str().unwrap());
    install_host(&["--destdir", root_s, "--binaries", built_s]);

    for p in PROGRAMS {
        assert_eq!(mode(&root.join("usr/local/bin").join(p)), 0o755, "{p}");
    }
    for d in DAEMONS {
        let unit = root.join(format!("etc/systemd/system/baker-{d}.service"));
        assert_eq!(mode(&unit), 0o644);
        let text = std::fs::read_to_string(&unit).unwrap();
        assert!(
            text.contains(&format!("ExecStart=/usr/local/bin/baker-{d}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("EnvironmentFile=-/etc/baker/{d}.env\n")),
            "{text}"
        );
        for hardening in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "Restart=on-failure",
        ] {
            assert!(text.contains(hardening), "{d}: no {hardening}");
        }
        // Settings may hold the token: readable by root only.
        assert_eq!(mode(&root.join(format!("etc/baker/{d}.env"))), 0o600, "{d}");
    }
    assert_eq!(mode(&root.join("etc/baker/registrar.toml")), 0o644);
    let template = root.join("etc/systemd/system/baker-registrar@.service");
    let text = std::fs::read_to_string(&template).unwrap();
    assert!(
        text.contains("EnvironmentFile=/etc/baker/registrar-%i.env\n"),
        "{text}"
    );

    // A second install keeps what the user wrote.
    let env = root.join("etc/baker/registrar.env");
    std::fs::write(&env, "BAKER_DIRECTORY=http://directory.example:7700\n").unwrap();
    let out = install_host(&["--destdir", root_s, "--binaries", built_s]);
    assert_eq!(
        std::fs::read_to_string(&env).unwrap(),
        "BAKER_DIRECTORY=http://directory.example:7700\n"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept"));

    install_host(&["--destdir", root_s, "--uninstall"]);
    for p in PROGRAMS {
        assert!(!root.join("usr/local/bin").join(p).exists(), "{p} left");
    }
    for d in DAEMONS {
        assert!(!root
            .join(format!("etc/systemd/system/baker-{d}.service"))
            .exists());
        assert!(
            root.join(format!("etc/baker/{d}.env")).exists(),
            "{d}.env removed"
        );
    }
    assert!(!template.exists());
}

#[test]
fn the_installed_units_pass_systemd_analyze_verify() {
    if !require(Needs::Systemd) {
        return;
    }
    // Installed under a prefix of its own (no staging root), so that each unit's ExecStart
    // names a file that exists, as verify requires.
    let tmp = tempfile::tempdir().unwrap();
    let built = stub_binaries(tmp.path());
    let (prefix, units, etc) = (
        tmp.path().join("prefix"),
        tmp.path().join("units"),
        tmp.path().join("etc"),
    );
    install_host(&[
        "--prefix",
        prefix.to_str().unwrap(),
        "--unitdir",
        units.to_str().unwrap(),
        "--sysconfdir",
        etc.to_str().unwrap(),
        "--binaries",
        built.to_str().unwrap(),
    ]);
    let mut files: Vec<PathBuf> = DAEMONS
        .iter()
        .map(|d| units.join(format!("baker-{d}.service")))
        .collect();
    // The template, as an instance of it.
    let instance = units.join("baker-registrar@greeting.service");
    std::os::unix::fs::symlink(units.join("baker-registrar@.service"), &instance).unwrap();
    files.push(instance);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        text.contains(&format!(
            "ExecStart={}/bin/baker-directory",
            prefix.display()
        )),
        "{text}"
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()
        .expect("running systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 on an unknown key, with only a warning: any output is a finding.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify found problems:\n{said}"
    );
}
