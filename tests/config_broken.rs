//! The broken-pipeline corpus (`tests/broken/*.toml`, each with the exact `.stderr` it must
//! produce), `--set` and file-level errors, JSON output, and a no-panic fuzz of valid files.
//!
//! Set `LORA_BLESS=1` to rewrite the `.stderr` files after an intended change of wording.

use std::path::PathBuf;
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;

fn root() -> PathBuf {
    crate::support::repo_root()
}

fn lora() -> Command {
    Command::cargo_bin("lora").expect("the lora binary is built")
}

#[test]
fn every_broken_file_gives_exit_2_and_its_exact_diagnostics() {
    let dir = root().join("tests/broken");
    let bless = std::env::var_os("LORA_BLESS").is_some();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert!(names.len() >= 30, "the corpus needs at least 30 broken files, has {}", names.len());
    let mut failures = Vec::new();
    for name in &names {
        let out = lora().current_dir(&dir).args(["validate", name]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let expected_path = dir.join(name.replace(".toml", ".stderr"));
        if bless {
            std::fs::write(&expected_path, &stderr).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if out.status.code() != Some(2) {
            failures.push(format!("{name}: exit {:?}, expected 2\n{stderr}", out.status.code()));
        } else if stderr != expected {
            failures.push(format!("{name}: stderr differs\n--- expected\n{expected}--- got\n{stderr}"));
        }
        assert!(!stderr.contains("panicked"), "{name} made lora panic:\n{stderr}");
    }
    assert!(failures.is_empty(), "{} of {} corpus files failed:\n{}", failures.len(), names.len(), failures.join("\n"));
}

#[test]
fn set_overrides_are_typed_and_their_errors_name_the_set_source() {
    let out = lora()
        .current_dir(root())
        .args(["validate", "pipelines/tiny.toml", "--set", "train.learning_rate=fast", "--set", "train.max_stepz=3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let expected = "\
--set:1:21: error: `train.learning_rate` must be a number; found the string \"fast\"
  |
1 | train.learning_rate=fast
  |                     ^^^^

--set:2:7: error: unknown key `max_stepz` in [train]
  |
2 | train.max_stepz=3
  |       ^^^^^^^^^
  = help: did you mean `max_steps`?

";
    assert_eq!(String::from_utf8_lossy(&out.stderr), expected);

    let ok = lora()
        .current_dir(root())
        .args(["validate", "pipelines/tiny.toml", "--set", "train.learning_rate=2e-4", "--set", "model.variant=fp16"])
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("lr 0.0002"));
}

#[test]
fn a_file_over_the_size_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, "# padding\n".repeat(120_000)).unwrap();
    let out = lora().current_dir(dir.path()).args(["validate", "big.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("big.toml:1:1: error: the file is 1200000 bytes; a pipeline file is at most 1048576 bytes"), "{stderr}");
}

#[test]
fn missing_file_and_folder_are_errors_with_exit_2() {
    let out = lora().current_dir(root()).args(["validate", "no-such.toml", "tests"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such.toml:1:1: error: cannot read `no-such.toml`: no such file"), "{stderr}");
    assert!(stderr.contains("tests:1:1: error: cannot read `tests`: it is a folder, not a pipeline file"), "{stderr}");
}

#[test]
fn json_format_lists_every_diagnostic_with_its_location() {
    let out = lora()
        .current_dir(root().join("tests/broken"))
        .args(["validate", "--format", "json", "many-errors.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let list = list.as_array().expect("a JSON list");
    assert_eq!(list.len(), 5, "{list:#?}");
    let first = &list[0];
    assert_eq!(first["file"], "many-errors.toml");
    assert_eq!(first["line"], 7);
    assert_eq!(first["column"], 1);
    assert_eq!(first["key_path"], "dataset.image_colum");
    assert_eq!(first["severity"], "error");
    assert_eq!(first["help"], "did you mean `image_column`?");
    assert!(out.stderr.is_empty(), "json mode prints nothing on stderr");
}

/// A small deterministic generator (xorshift64*), so the fuzz cases are the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Break `text` the way a hurried user might: delete, duplicate or swap lines, flip or insert
/// bytes, truncate.
fn mutate(text: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = text.to_vec();
    let pieces: &[&[u8]] = &[b"=", b"\"", b"[", b"]", b"\n", b"0", b"-1", b"1e400", b"{", b".", b"\xff", b"[[x]]", b"nan", b"''"];
    for _ in 0..1 + rng.below(3) {
        match rng.below(6) {
            0 if !out.is_empty() => {
                let at = rng.below(out.len());
                out.remove(at);
            }
            1 => {
                let at = rng.below(out.len() + 1);
                let piece = pieces[rng.below(pieces.len())];
                out.splice(at..at, piece.iter().copied());
            }
            2 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] = out[at].wrapping_add(1 + rng.below(200) as u8);
            }
            3 => {
                let len = rng.below(out.len() + 1);
                out.truncate(len);
            }
            4 => {
                let mut lines: Vec<&[u8]> = out.split(|b| *b == b'\n').collect();
                if lines.len() > 1 {
                    let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
                    lines.swap(a, b);
                }
                out = lines.join(&b'\n');
            }
            _ => {
                let lines: Vec<&[u8]> = out.split(|b| *b == b'\n').collect();
                let dup = lines[rng.below(lines.len())].to_vec();
                out.extend_from_slice(b"\n");
                out.extend_from_slice(&dup);
            }
        }
    }
    out
}

#[test]
fn mutated_pipelines_never_panic() {
    let seeds: Vec<(&str, Vec<u8>)> = ["pipelines/tiny.toml", "pipelines/naruto.toml"]
        .iter()
        .map(|p| (*p, std::fs::read(root().join(p)).unwrap()))
        .collect();
    // One folder below the root, like pipelines/, so the relative paths resolve and the
    // file-system checks run too.
    let dir = tempfile::tempdir_in(root()).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut outcomes = [0usize; 2];
    for case in 0..400 {
        let (name, text) = &seeds[case % seeds.len()];
        let mutated = mutate(text, &mut rng);
        let path = dir.path().join(format!("case{case}.toml"));
        std::fs::write(&path, &mutated).unwrap();
        let result = std::panic::catch_unwind(|| lora::preflight::load_pipeline(&path, &[]));
        match result {
            Ok(Ok(_)) => outcomes[0] += 1,
            Ok(Err(diags)) => {
                outcomes[1] += 1;
                assert!(diags.has_errors(), "case {case} from {name}: Err without an error");
                for d in diags.iter() {
                    assert!(d.line >= 1 && d.col >= 1, "case {case}: bad location {d:?}");
                }
            }
            Err(_) => panic!("case {case} (mutated {name}) panicked; input:\n{}", String::from_utf8_lossy(&mutated)),
        }
    }
    assert!(outcomes[1] > 100, "the mutations should mostly break the files: {outcomes:?}");
    // A few through the binary, which must exit 0 or 2 and never print a backtrace.
    for case in 0..8 {
        let path = dir.path().join(format!("case{case}.toml"));
        let out = lora().arg("validate").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(matches!(out.status.code(), Some(0 | 2)), "case {case}: exit {:?}\n{stderr}", out.status.code());
        assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "case {case}:\n{stderr}");
    }
}

/// A copy of `pipelines/tiny.toml` in `dir` with its paths made absolute, so it validates from
/// anywhere; `extra` is appended (TOML tables).
fn tiny_pipeline_in(dir: &std::path::Path, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(root().join("pipelines/tiny.toml")).unwrap();
    let abs = root().join("tests").display().to_string();
    let text = text.replace("\"../tests", &format!("\"{abs}")).replace("dir = \"../runs/tiny\"", &format!("dir = {:?}", dir.join("out").display().to_string()));
    let path = dir.join("p.toml");
    std::fs::write(&path, text + extra).unwrap();
    path
}

fn validate_in(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = lora().current_dir(dir).arg("validate").args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[cfg(unix)]
fn mkfifo(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

#[cfg(unix)]
#[test]
fn special_files_are_named_for_what_they_are_and_never_read() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("fifo.toml"));
    std::os::unix::fs::symlink("loop-b.toml", dir.path().join("loop-a.toml")).unwrap();
    std::os::unix::fs::symlink("loop-a.toml", dir.path().join("loop-b.toml")).unwrap();
    std::os::unix::fs::symlink("gone.toml", dir.path().join("dangling.toml")).unwrap();
    let cases = [
        ("fifo.toml", "fifo.toml:1:1: error: cannot read `fifo.toml`: it is a named pipe (FIFO), not a pipeline file"),
        ("/dev/zero", "/dev/zero:1:1: error: cannot read `/dev/zero`: it is a character device, not a pipeline file"),
        ("loop-a.toml", "loop-a.toml:1:1: error: cannot read `loop-a.toml`: it is a symbolic link loop"),
        ("dangling.toml", "dangling.toml:1:1: error: cannot read `dangling.toml`: it is a symbolic link to something that does not exist"),
    ];
    for (name, expected) in cases {
        // A FIFO nobody writes to, or /dev/zero, would block or read forever: a timeout guards
        // the test itself.
        let mut child = lora().current_dir(dir.path()).args(["validate", name]).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed().as_secs() > 20 {
                child.kill().unwrap();
                panic!("`lora validate {name}` did not finish");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.starts_with(expected), "{name}: expected `{expected}`, got:\n{stderr}");
    }

    // The same kinds given as a dataset or model path.
    mkfifo(&dir.path().join("data-fifo"));
    std::os::unix::fs::symlink("model-loop", dir.path().join("model-loop")).unwrap();
    let pipeline = tiny_pipeline_in(dir.path(), "");
    let data = dir.path().join("data-fifo").display().to_string();
    let model = dir.path().join("model-loop").display().to_string();
    let (code, stderr) = validate_in(dir.path(), &["p.toml", "--set", &format!("dataset.path={data:?}"), "--set", &format!("model.path={model:?}")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&format!("error: model folder `{model}` is a symbolic link loop")), "{stderr}");
    assert!(stderr.contains(&format!("error: dataset path `{data}` is a named pipe (FIFO), not a file or folder")), "{stderr}");
    assert!(!stderr.contains("does not exist"), "{stderr}");
    drop(pipeline);
}

#[cfg(unix)]
#[test]
fn a_folder_name_that_is_not_utf8_is_refused_at_validate() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    std::fs::create_dir(&odd).unwrap();
    tiny_pipeline_in(&odd, "");
    // Relative paths resolve against the pipeline's folder, whose name is not UTF-8.
    let text = std::fs::read_to_string(odd.join("p.toml")).unwrap();
    let out_line = text.lines().find(|l| l.starts_with("dir = ")).unwrap().to_string();
    std::fs::write(odd.join("p.toml"), text.replace(&out_line, "dir = \"out\"")).unwrap();
    let out = lora().current_dir(dir.path()).arg("validate").arg(odd.join("p.toml")).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error: `output.dir` resolves to `") && stderr.contains("whose name is not UTF-8 text"), "{stderr}");
}

#[test]
fn cuda_device_on_a_build_without_cuda_is_refused_at_validate() {
    if lora::device::CUDA_BUILT {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    tiny_pipeline_in(dir.path(), "");
    for device in ["cuda", "cuda:1"] {
        let (code, stderr) = validate_in(dir.path(), &["p.toml", "--set", &format!("train.device=\"{device}\"")]);
        assert_eq!(code, Some(2), "{stderr}");
        let expected = format!(
            "--set:1:14: error: train.device = \"{device}\" but this `lora` was built without CUDA\n  |\n1 | train.device=\"{device}\"\n  |              {}\n  = help: build with `cargo build --release --features cuda`",
            "^".repeat(device.len() + 2)
        );
        assert!(stderr.starts_with(&expected), "expected:\n{expected}\ngot:\n{stderr}");
    }
    assert_eq!(validate_in(dir.path(), &["p.toml", "--set", "train.device=\"auto\""]).0, Some(0));
}

#[test]
fn output_dir_may_not_be_home_or_hold_another_run() {
    let dir = tempfile::tempdir().unwrap();
    tiny_pipeline_in(dir.path(), "");
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("runs/a")).unwrap();
    std::fs::write(home.join("runs/a/lora.lock"), "{}").unwrap();
    let set = |p: &std::path::Path| format!("output.dir={:?}", p.display().to_string());
    let run = |out: &std::path::Path| {
        let o = lora().current_dir(dir.path()).env("HOME", &home).args(["validate", "p.toml", "--set", &set(out)]).output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (code, stderr) = run(&home);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&format!("error: output folder `{}` is your home folder", home.display())), "{stderr}");
    let (code, stderr) = run(&home.join("runs"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&format!("error: output folder `{}` holds another run's folder `a` (it has lora.lock)", home.join("runs").display())), "{stderr}");
    // Further up, too; the run's own folder and a sibling are fine.
    let (code, stderr) = run(dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("holds another run's folder `home/runs/a`"), "{stderr}");
    assert_eq!(run(&home.join("runs/a")).0, Some(0));
    // A run's own `earlier/` (earlier results set aside, each with a copy of its lock) is not
    // another run.
    std::fs::create_dir_all(home.join("runs/a/earlier/20261204-101010-step30")).unwrap();
    std::fs::write(home.join("runs/a/earlier/20261204-101010-step30/lora.lock"), "{}").unwrap();
    assert_eq!(run(&home.join("runs/a")).0, Some(0));
    assert_eq!(run(&home.join("runs/b")).0, Some(0));
}

#[test]
fn a_rank_wider_than_a_targeted_layer_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    tiny_pipeline_in(dir.path(), "\n[adapter]\nrank = 48\n");
    let (code, stderr) = validate_in(dir.path(), &["p.toml"]);
    assert_eq!(code, Some(0), "{stderr}");
    // The tiny UNet's attention in the first block is 32 wide (its weights' headers say so).
    assert!(stderr.contains("warning: rank 48 is above the width of"), "{stderr}");
    assert!(stderr.contains("(e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k`, 32 x 32)"), "{stderr}");
    let (code, stderr) = validate_in(dir.path(), &["p.toml", "--set", "adapter.rank=32"]);
    assert_eq!(code, Some(0));
    assert!(!stderr.contains("warning: rank"), "{stderr}");
}

#[test]
fn two_numbers_for_one_key_are_called_that_in_a_set_override_too() {
    let out = lora().current_dir(root()).args(["validate", "pipelines/tiny.toml", "--set", "train.learning_rate=1e-3 1e-4"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.ends_with("  = help: one value per key: `1e-3 1e-4` is 2 values\n\n"), "{stderr}");
}
