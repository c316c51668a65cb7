//! The validate stage (and validation while training): images of the validation prompts with the
//! exported file applied, their grid and their TensorBoard summaries.

use std::path::Path;

use anyhow::Result;

use crate::runner::lock::Fingerprint;
use crate::runner::plan::{Plan, StageId};
use crate::runner::resolve::{diffusers_file, kohya_file,};
use super::{Run, out, tidy, Output, Ran, Stage};
use crate::config::choice_name;
use crate::config::types as cfg;
use crate::inference::validation::{validation_file_name, validation_images};
use crate::layout::TRAINED_FILE;
use crate::util::path::tidy_path;

pub(super) const VALIDATE: Stage = Stage {
    id: StageId::Validate,
    // Validate reads export's file (`validation_adapter`), so it comes after export in the table;
    // its fingerprint names that file, so a format change that leaves it the same (another format
    // added) reruns only export, one that changes it (diffusers dropped) reruns validate too.
    depends_on: &[StageId::Train],
    tracked: true,
    off: |p| p.pipeline().validation.prompts.is_empty().then_some("no validation prompts"),
    fingerprint: |p| {
        Fingerprint::new("validate")
            .add("train", p.fingerprint(StageId::Train))
            .add("adapter", &validation_adapter(p.pipeline()))
            .add_toml("validation", p.table("validation"))
            .add("resolution", &crate::runner::resolve::resolution_text(p.pipeline()))
            .finish()
    },
    reads: |p| vec![tidy(p, &validation_adapter(p.pipeline()))],
    outputs: |p| {
        let mut o: Vec<Output> = validation_files(p.pipeline()).into_iter().map(|f| out(f, "validation image", true)).collect();
        o.push(out(format!("validation/{}", crate::report::grid::GRID_FILE), "all validation images in one grid (rows = prompts)", true));
        if events_dir(p).is_some() {
            let dir = p.pipeline().logging.dir.display().to_string();
            o.push(out(format!("{dir}/events.out.tfevents.<...>"), "TensorBoard events: the validation images (validation/prompt<i>)", false));
        }
        o
    },
    describe: |p| {
        let v = &p.pipeline().validation;
        format!(
            "{} image(s) per prompt for {} prompt(s), {} steps ({}), guidance {}, with {}",
            v.num_images,
            v.prompts.len(),
            v.steps,
            choice_name(&v.scheduler),
            v.guidance_scale,
            validation_adapter(p.pipeline())
        )
    },
    run: Run::Model(|ctx, model| {
        let dir = ctx.plan.out_dir.clone();
        let (device, sd) = (model.device.clone(), &mut model.sd);
        // As the reference, the final images come from the saved file loaded into a fresh
        // pipeline: the training branches are taken off and the exported file applied.
        sd.unet.clear_loras();
        sd.text.all_linears_mut().into_iter().for_each(|l| l.loras.clear());
        let adapter = dir.join(validation_adapter(ctx.plan.pipeline()));
        crate::adapters::lora::apply_lora_file(sd, &adapter, 1.0)?;
        tracing::info!("validate: with {}", tidy_path(&adapter).display());
        let files = validation_images(sd, ctx.plan.pipeline(), &dir.join("validation"), &device)?;
        // TensorBoard shows the final images at the last training step.
        let step = ctx.report.train.as_ref().map(|t| t.global_step as u64).or_else(|| {
            ctx.lock.stages.get(StageId::Train.name()).and_then(|r| r.details.get("max_train_steps")).and_then(serde_json::Value::as_u64)
        });
        let grid = publish_validation(ctx.plan, &files, &dir.join("validation"), step.unwrap_or(0))?;
        ctx.report.files.extend(files);
        ctx.report.files.push(grid);
        Ok(Ran::done())
    }),
};

/// The file the final validation applies, relative to the output folder: the exported diffusers
/// file when `output.formats` writes one, else the kohya one (the train stage's own file only
/// when no format is asked for).
pub(crate) fn validation_adapter(p: &cfg::Pipeline) -> String {
    let file = if p.output.formats.contains(&cfg::OutputFormat::Diffusers) {
        diffusers_file(p)
    } else if p.output.formats.contains(&cfg::OutputFormat::Kohya) {
        kohya_file(p)
    } else {
        TRAINED_FILE.to_string()
    };
    // With `train.ema_decay` the final images show the moving average, which is what is kept.
    if p.train.ema_decay.is_some() {
        crate::layout::ema_name(&file)
    } else {
        file
    }
}

/// The final validation images, relative to the output folder (what `validation_images` writes).
pub(crate) fn validation_files(p: &cfg::Pipeline) -> Vec<String> {
    (0..p.validation.prompts.len())
        .flat_map(|i| (0..p.validation.num_images).map(move |j| format!("validation/{}", validation_file_name(i, j as usize))))
        .collect()
}

/// The TensorBoard folder, when `logging.report_to = "tensorboard"`.
pub(super) fn events_dir(p: &Plan) -> Option<std::path::PathBuf> {
    let pl = p.pipeline();
    (pl.logging.report_to == cfg::ReportTo::Tensorboard).then(|| p.out_dir.join(&pl.logging.dir))
}

/// After a validation point wrote `files` into `dir`: their grid and, with TensorBoard, the
/// images in the event file at `step`.
pub(super) fn publish_validation(p: &Plan, files: &[std::path::PathBuf], dir: &Path, step: u64) -> Result<std::path::PathBuf> {
    let events = events_dir(p);
    let v = &p.pipeline().validation;
    crate::report::grid::publish_validation_with_prompts(files, &v.prompts, v.num_images as usize, dir, events.as_deref().map(|d| (d, step)))
}
