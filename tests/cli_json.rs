//! JSON output is one flag everywhere: `--json` on `validate`, `plan` and `inspect` (validate's
//! older `--format json` still works, hidden).

use std::path::PathBuf;

use assert_cmd::Command;

fn root() -> PathBuf {
    crate::support::repo_root()
}

fn lora() -> Command {
    Command::cargo_bin("lora").unwrap()
}

#[test]
fn every_command_with_json_output_takes_json() {
    for cmd in ["validate", "plan", "inspect"] {
        let help = lora().args([cmd, "--help"]).output().unwrap();
        let text = String::from_utf8(help.stdout).unwrap();
        assert!(text.contains("--json"), "`lora {cmd} --help` lists --json:\n{text}");
    }
    let help = String::from_utf8(lora().args(["validate", "--help"]).output().unwrap().stdout).unwrap();
    assert!(!help.contains("--format"), "the old spelling is hidden:\n{help}");
}

#[test]
fn validate_json_is_the_old_format_json() {
    let run = |args: &[&str]| lora().current_dir(root().join("tests/broken")).arg("validate").args(args).arg("many-errors.toml").output().unwrap();
    let new = run(&["--json"]);
    let old = run(&["--format", "json"]);
    assert_eq!(new.status.code(), Some(2));
    assert_eq!(old.status.code(), Some(2));
    assert_eq!(new.stdout, old.stdout);
    let list: serde_json::Value = serde_json::from_slice(&new.stdout).expect("stdout is JSON");
    assert_eq!(list.as_array().map(Vec::len), Some(5), "{list:#}");
    assert!(new.stderr.is_empty(), "json mode prints nothing on stderr");
    // A valid file: an empty list, exit 0.
    let ok = lora().args(["validate", "--json"]).arg(root().join("pipelines/tiny.toml")).output().unwrap();
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&ok.stdout).unwrap(), serde_json::json!([]));
}
