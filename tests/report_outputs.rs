//! What a run shows you (tiny pipeline): the validation grid of every validation point, the
//! validation images in the TensorBoard event file (read back here with an independent record
//! parser and protobuf decoder), `loss.png`, and the summary `lora run` prints (smoothed losses,
//! it/s, tidy paths).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lora::config::load_pipeline;
use lora::runner::lock::Lock;
use lora::runner::plan::Plan;
use lora::runner::run::run_pipeline;
use lora::runner::stages::{RunOptions, Session};
use lora::runner::stages::{describe, BOOKKEEPING};
use crate::support::matches_output;

fn root() -> PathBuf {
    crate::support::repo_root()
}

/// 4 steps of batch 2, two prompts x two images of 2 sampling steps, validation every 2 steps:
/// one mid-training validation point (step 2) and the final one (step 4).
const OVERRIDES: &[&str] = &[
    "train.max_steps=4",
    "train.batch_size=2",
    "checkpoints.every_steps=2",
    "checkpoints.total_limit=1",
    "validation.prompts=[\"a red circle\", \"a blue square\"]",
    "validation.num_images=2",
    "validation.steps=2",
    "validation.every_steps=2",
    "logging.report_to=\"tensorboard\"",
];

/// The gap between grid tiles (report::grid's layout, restated: the test checks the layout).
const GAP: u32 = 2;
const RES: u32 = 64;

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

/// The tile of `grid` at row `r`, column `c` equals `img` pixel for pixel.
/// Whether the tile at row `r`, column `c` of `grid` is `img`, with a band of `label` pixels
/// above each row (the prompt's label in `grid.png`; none in the TensorBoard rows).
fn tile_equals(grid: &image::RgbImage, r: u32, c: u32, img: &image::RgbImage, label: u32) -> bool {
    let top = r * (RES + GAP + label) + label;
    (0..RES).all(|y| (0..RES).all(|x| grid.get_pixel(c * (RES + GAP) + x, top + y) == img.get_pixel(x, y)))
}

fn check_grid(dir: &Path) {
    let grid = rgb(&dir.join("grid.png"));
    let label = lora::report::grid::LABEL_HEIGHT;
    assert_eq!(grid.dimensions(), (2 * RES + GAP, 2 * RES + GAP + 2 * label), "{}: 2 prompts x 2 images, each row labelled", dir.display());
    for r in 0..2 {
        for c in 0..2 {
            let img = rgb(&dir.join(format!("prompt{r}-{c}.png")));
            assert!(tile_equals(&grid, r, c, &img, label), "{}: row {r} column {c} is prompt{r}-{c}.png", dir.display());
        }
        // The label band holds dark text pixels (the prompt), the gap below the tiles does not.
        let band_top = r * (RES + GAP + label);
        let dark = (band_top..band_top + label).flat_map(|y| (0..2 * RES + GAP).map(move |x| (x, y))).filter(|&(x, y)| grid.get_pixel(x, y).0.iter().all(|&v| v < 128)).count();
        assert!(dark > 10, "{}: row {r}'s label is drawn ({dark} dark pixels)", dir.display());
    }
}

// --- An event-file reader written from the TFRecord and protobuf specs, sharing no code with
// --- src/report/tensorboard.rs.

/// CRC-32C, bit by bit (reflected polynomial 0x82F63B78).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    ((c >> 15) | (c << 17)).wrapping_add(0xA282_EAD8)
}

/// Every record of a TFRecord file; panics on a bad length or data checksum.
fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= 16, "truncated record header");
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(rest[8..12].try_into().unwrap()), masked(&rest[..8]), "length CRC");
        let data = &rest[12..12 + len];
        assert_eq!(u32::from_le_bytes(rest[12 + len..16 + len].try_into().unwrap()), masked(data), "data CRC");
        out.push(data.to_vec());
        rest = &rest[16 + len..];
    }
    out
}

#[derive(Debug)]
enum Field {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

/// The fields of one protobuf message, by number, in order.
fn fields(msg: &[u8]) -> Vec<(u64, Field)> {
    fn varint(msg: &[u8], pos: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = msg[*pos];
            *pos += 1;
            v |= ((b & 0x7F) as u64) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < msg.len() {
        let key = varint(msg, &mut pos);
        let f = match key & 7 {
            0 => Field::Varint(varint(msg, &mut pos)),
            1 => {
                pos += 8;
                Field::Fixed64(msg[pos - 8..pos].try_into().unwrap())
            }
            2 => {
                let n = varint(msg, &mut pos) as usize;
                pos += n;
                Field::Bytes(msg[pos - n..pos].to_vec())
            }
            5 => {
                pos += 4;
                Field::Fixed32(msg[pos - 4..pos].try_into().unwrap())
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, f));
    }
    out
}

fn bytes_of(fs: &[(u64, Field)], n: u64) -> Vec<&Vec<u8>> {
    fs.iter().filter(|(k, _)| *k == n).filter_map(|(_, f)| if let Field::Bytes(b) = f { Some(b) } else { None }).collect()
}

fn varint_of(fs: &[(u64, Field)], n: u64) -> Option<u64> {
    fs.iter().find(|(k, _)| *k == n).and_then(|(_, f)| if let Field::Varint(v) = f { Some(*v) } else { None })
}

/// One image summary: `Event.step`, `Value.tag`, `Image.{height, width, colorspace}` and the PNG.
#[derive(Debug)]
struct TbImage {
    step: u64,
    height: u64,
    width: u64,
    colorspace: u64,
    png: Vec<u8>,
}

/// The image summaries of every event file in `dir`, by tag; and `(step, value)` of `train_loss`
/// and of `eval_loss`.
fn tb_images(dir: &Path) -> (BTreeMap<String, Vec<TbImage>>, Vec<(u64, f32)>, Vec<(u64, f32)>) {
    let mut images: BTreeMap<String, Vec<TbImage>> = BTreeMap::new();
    let mut loss_steps = Vec::new();
    let mut eval_steps = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files {
        for rec in records(&std::fs::read(&file).unwrap()) {
            // Event { wall_time = 1, step = 2, file_version = 3, summary = 5 }
            let event = fields(&rec);
            let step = varint_of(&event, 2).unwrap_or(0);
            let wall_time = event.iter().find_map(|(k, f)| if let (1, Field::Fixed64(b)) = (k, f) { Some(f64::from_le_bytes(*b)) } else { None });
            assert!(wall_time.is_some_and(|t| t > 1.5e9), "every event has a wall time in seconds since 1970: {wall_time:?}");
            for summary in bytes_of(&event, 5) {
                // Summary { value = 1 }, Value { tag = 1, simple_value = 2, image = 4 }
                for value in bytes_of(&fields(summary), 1) {
                    let v = fields(value);
                    let tag = String::from_utf8(bytes_of(&v, 1)[0].clone()).unwrap();
                    if tag == "train_loss" || tag == "eval_loss" {
                        let value = v.iter().find_map(|(k, f)| if let (2, Field::Fixed32(b)) = (k, f) { Some(f32::from_le_bytes(*b)) } else { None });
                        let list = if tag == "train_loss" { &mut loss_steps } else { &mut eval_steps };
                        list.push((step, value.expect("a scalar has a simple_value")));
                    }
                    for img in bytes_of(&v, 4) {
                        // Image { height = 1, width = 2, colorspace = 3, encoded_image_string = 4 }
                        let im = fields(img);
                        images.entry(tag.clone()).or_default().push(TbImage {
                            step,
                            height: varint_of(&im, 1).unwrap(),
                            width: varint_of(&im, 2).unwrap(),
                            colorspace: varint_of(&im, 3).unwrap(),
                            png: bytes_of(&im, 4)[0].clone(),
                        });
                    }
                }
            }
        }
    }
    (images, loss_steps, eval_steps)
}

use crate::runner_stages::files_under;

#[test]
fn crc32c_matches_the_rfc_3720_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn a_run_writes_grids_tensorboard_images_and_a_loss_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut overrides: Vec<String> = OVERRIDES.iter().map(|s| s.to_string()).collect();
    overrides.push(format!("output.dir={:?}", out.display().to_string()));
    let loaded = load_pipeline(&root().join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    let views = describe(&Plan::resolve(&loaded), &Lock::default(), false);
    let report = run_pipeline(&loaded, &mut Session::default(), &RunOptions::default(), Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(report.train.as_ref().unwrap().global_step, 4);

    // Grids: the final validation and the one at step 2, each tile the image of its prompt/column.
    check_grid(&out.join("validation"));
    check_grid(&out.join("validation/step-2"));
    assert!(report.files.contains(&out.join("validation/grid.png")), "the summary lists the grid");

    // plan announces every file written, grids, event files and loss.png included, and every
    // exact name it announces exists.
    let on_disk = files_under(&out);
    let writes: Vec<_> = views.iter().flat_map(|v| v.writes.clone()).collect();
    for f in &on_disk {
        assert!(BOOKKEEPING.contains(&f.as_str()) || writes.iter().any(|w| matches_output(&w.path, f)), "{f} is not announced by plan");
    }
    for w in writes.iter().filter(|w| !w.path.contains('<')) {
        assert!(on_disk.iter().any(|f| matches_output(&w.path, f)), "plan announces {} but the run did not write it", w.path);
    }
    assert!(writes.iter().any(|w| w.path == "loss.png") && writes.iter().any(|w| w.path == "validation/grid.png"));

    // TensorBoard: one image per prompt (its row of 2 images) at steps 2 and 4, RGB PNGs whose
    // pixels are the validation files'; the scalars are still there, each step once.
    let (images, loss_steps, eval_steps) = tb_images(&out.join("logs"));
    assert_eq!(images.keys().collect::<Vec<_>>(), ["validation/prompt0", "validation/prompt1"]);
    assert_eq!(loss_steps.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    // The fixed-noise evaluation before and after training: in the event file and in
    // metrics.jsonl with the same values, and in the summary.
    let evals = lora::report::metrics::read_evals(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 4]);
    assert_eq!(eval_steps, evals.iter().map(|&(s, e)| (s, e as f32)).collect::<Vec<_>>());
    assert_eq!(report.eval_loss, (Some(evals[0].1), Some(evals[1].1)));
    for (i, (tag, list)) in images.iter().enumerate() {
        assert_eq!(list.iter().map(|e| e.step).collect::<Vec<_>>(), vec![2, 4], "{tag}");
        for e in list {
            assert_eq!((e.height, e.width, e.colorspace), (RES as u64, (2 * RES + GAP) as u64, 3), "{tag} at step {}", e.step);
            let png = image::load_from_memory_with_format(&e.png, image::ImageFormat::Png).unwrap().to_rgb8();
            assert_eq!(png.dimensions(), (2 * RES + GAP, RES), "the PNG has the size the summary states");
            let step_dir = if e.step == 2 { out.join("validation/step-2") } else { out.join("validation") };
            for c in 0..2 {
                assert!(tile_equals(&png, 0, c, &rgb(&step_dir.join(format!("prompt{i}-{c}.png"))), 0), "{tag} step {} image {c}", e.step);
            }
        }
    }

    // loss.png: the plot's size, many colours (curves, text, grid), not one flat fill.
    let plot = rgb(&out.join("loss.png"));
    assert_eq!(plot.dimensions(), (900, 600));
    let colours: std::collections::BTreeSet<[u8; 3]> = plot.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 20, "loss.png has {} colour(s)", colours.len());

    // The summary's smoothed losses are the means of the first and last tenth (1 of 4 steps)
    // of metrics.jsonl, computed here from the file.
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect();
    // TensorBoard stores the loss as f32: equal to the f64 of metrics.jsonl rounded.
    assert_eq!(loss_steps.iter().map(|s| s.1).collect::<Vec<_>>(), losses.iter().map(|&l| l as f32).collect::<Vec<_>>());
    let trend = report.loss_trend.expect("a loss trend");
    assert_eq!((trend.steps, trend.window), (4, 1));
    assert_eq!((trend.first_mean, trend.last_mean), (losses[0], losses[3]));
    assert!(report.train_rate.is_some_and(|r| r > 0.0 && r.is_finite()));
}

/// `lora run` as the README shows it, from a folder holding `pipelines/tiny.toml` whose output
/// is `../runs/tiny`: the summary says `runs/tiny/...`, gives a rate and the smoothed losses.
#[test]
fn the_summary_shows_tidy_paths_a_rate_and_smoothed_losses() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    let fixtures = root().join("tests/fixtures");
    let toml = format!(
        "[model]\npath = {:?}\n[dataset]\nkind = \"parquet\"\npath = {:?}\n[preprocess]\nresolution = 64\ncenter_crop = true\n\
         [train]\nmax_steps = 3\nbatch_size = 2\nseed = 0\ndevice = \"cpu\"\n[output]\ndir = \"../runs/tiny\"\n",
        fixtures.join("tiny-sd").display().to_string(),
        fixtures.join("datasets/shapes-parquet").display().to_string()
    );
    std::fs::write(dir.path().join("pipelines/tiny.toml"), toml).unwrap();
    let out = assert_cmd::Command::cargo_bin("lora").unwrap().current_dir(dir.path()).env("RAYON_NUM_THREADS", "1").args(["run", "pipelines/tiny.toml"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("  wrote      runs/tiny/pytorch_lora_weights.safetensors\n"), "{stdout}");
    assert!(!stdout.contains(".."), "no `..` in the paths shown: {stdout}");
    assert!(stdout.contains("(mean of the first 1 of 3 steps) -> "), "{stdout}");
    let rate = stdout.lines().find(|l| l.starts_with("  train time")).expect("a train time line");
    assert!(rate.ends_with(" it/s)") || rate.ends_with(" s/it)"), "{rate}");
    assert!(dir.path().join("runs/tiny/loss.png").is_file());
}
