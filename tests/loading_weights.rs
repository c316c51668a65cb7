//! Local model folders and weight files: the fixture folder resolves, variant and sharded
//! weights are chosen, pickles are refused, the checking `VarBuilder` names missing / extra /
//! wrongly shaped tensors, old VAE attention names load, and damaged files give clear errors.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora::models::loading::{
    locate_model_files, plan_model_files, resolve_model_dir, ComponentWeights, LoadOptions, ModelSource,
    VariantPolicy, WeightChoice, WeightOptions,
};
use lora::models::weights;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
}

/// A tensor to write: name, shape, values (stored as f32 or f16).
struct Spec<'a> {
    name: &'a str,
    shape: &'a [usize],
    values: Vec<f32>,
}

fn spec<'a>(name: &'a str, shape: &'a [usize]) -> Spec<'a> {
    let n: usize = shape.iter().product();
    let values = (0..n).map(|i| (i as f32) * 0.25 - 1.0).collect();
    Spec { name, shape, values }
}

fn write_safetensors(path: &Path, specs: &[Spec], dtype: Dtype) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let bytes: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| match dtype {
            Dtype::F32 => s.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => s.values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            other => panic!("test helper does not write {other:?}"),
        })
        .collect();
    let views: Vec<(String, TensorView)> = specs
        .iter()
        .zip(&bytes)
        .map(|(s, b)| (s.name.to_string(), TensorView::new(dtype, s.shape.to_vec(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A stand-in network: one linear layer `block` of shape [3, 4].
fn build_block(vb: candle_nn::VarBuilder) -> candle_core::Result<(Tensor, Tensor)> {
    let vb = vb.pp("block");
    Ok((vb.get((3, 4), "weight")?, vb.get(3, "bias")?))
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// A diffusers folder with placeholder configs/tokenizer and the given weight files per component.
fn fake_model(root: &Path, weight_files: &[&str]) {
    for (rel, text) in [
        ("model_index.json", r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#),
        ("scheduler/scheduler_config.json", "{}"),
        ("tokenizer/vocab.json", "{}"),
        ("tokenizer/merges.txt", "#version: 0.2\n"),
        ("text_encoder/config.json", "{}"),
        ("unet/config.json", "{}"),
        ("vae/config.json", "{}"),
    ] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    for rel in weight_files {
        write_safetensors(&root.join(rel), &[spec("block.weight", &[3, 4]), spec("block.bias", &[3])], Dtype::F32);
    }
}

#[test]
fn fixture_folder_resolves_and_every_file_is_found() {
    let root = fixtures().join("tiny-sd");
    let source = root.to_str().unwrap();
    assert_eq!(ModelSource::parse(source).unwrap(), ModelSource::Local(root.clone()));
    assert_eq!(resolve_model_dir(source, &LoadOptions::default()).unwrap(), root);

    let files = locate_model_files(&root, None).unwrap();
    assert_eq!(files.root, root);
    assert_eq!(files.model_index, Some(root.join("model_index.json")));
    assert_eq!(files.scheduler_config, root.join("scheduler/scheduler_config.json"));
    assert_eq!(files.tokenizer_dir, root.join("tokenizer"));
    assert_eq!(files.unet.config, root.join("unet/config.json"));
    assert_eq!(files.unet.weights, vec![root.join("unet/diffusion_pytorch_model.safetensors")]);
    assert_eq!(files.vae.weights, vec![root.join("vae/diffusion_pytorch_model.safetensors")]);
    assert_eq!(files.text_encoder.weights, vec![root.join("text_encoder/model.safetensors")]);
    assert!(files.unet.weight_index.is_none());
    for path in files.all_paths() {
        assert!(path.is_file(), "{} should exist", path.display());
    }
    let tokenizer: BTreeSet<PathBuf> = files.tokenizer_files.iter().cloned().collect();
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        assert!(tokenizer.contains(&root.join("tokenizer").join(name)), "tokenizer file {name} not listed");
    }

    // The fixture UNet's weights open behind the checking backend with their real shapes.
    let unet = files.unet.open_weights("unet", &WeightOptions::default()).unwrap();
    assert_eq!(unet.shape("conv_in.weight"), Some(&[32usize, 4, 3, 3][..]));
    assert!(unet.names().len() > 100);
    let vb = unet.var_builder(DType::F32, &Device::Cpu);
    let w = vb.get((32, 4, 3, 3), "conv_in.weight").unwrap();
    assert_eq!(w.dims(), &[32, 4, 3, 3]);
    assert!(!unet.unread().contains(&"conv_in.weight".to_string()));
    assert!(unet.unread().contains(&"conv_in.bias".to_string()));
}

#[test]
fn sources_that_are_neither_folder_nor_hub_id_are_refused() {
    assert_eq!(ModelSource::parse("runwayml/stable-diffusion-v1-5").unwrap(), ModelSource::Hub("runwayml/stable-diffusion-v1-5".into()));
    assert_eq!(ModelSource::parse("gpt2").unwrap(), ModelSource::Hub("gpt2".into()));
    for bad in ["./no/such/folder", "/no/such/folder", "a/b/c", "org/--x", "org/..", ""] {
        let err = ModelSource::parse(bad).err().unwrap_or_else(|| panic!("{bad:?} must be refused")).to_string();
        assert!(err.contains("does not exist") || err.contains("empty"), "{bad:?}: {err}");
    }
    let file = fixtures().join("tiny-sd/model_index.json");
    let err = ModelSource::parse(file.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("is a file"), "{err}");
}

#[test]
fn variant_weights_are_chosen_by_name() {
    let both = set(&["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]);
    let base = "diffusion_pytorch_model";
    assert_eq!(
        weights::choose_weights("unet", &both, base, None, VariantPolicy::Required).unwrap(),
        WeightChoice::Single("diffusion_pytorch_model.safetensors".into())
    );
    assert_eq!(
        weights::choose_weights("unet", &both, base, Some("fp16"), VariantPolicy::Required).unwrap(),
        WeightChoice::Single("diffusion_pytorch_model.fp16.safetensors".into())
    );

    // The UNet/VAE variant must exist (the reference passes `variant` to both).
    let plain = set(&["config.json", "diffusion_pytorch_model.safetensors"]);
    let err = weights::choose_weights("unet", &plain, base, Some("fp16"), VariantPolicy::Required).unwrap_err().to_string();
    assert!(err.contains("diffusion_pytorch_model.fp16.safetensors") && err.contains("unet/"), "{err}");

    // Only a variant present and none asked for: say how to use it.
    let only_fp16 = set(&["diffusion_pytorch_model.fp16.safetensors"]);
    let err = weights::choose_weights("vae", &only_fp16, base, None, VariantPolicy::Required).unwrap_err().to_string();
    assert!(err.contains("variant"), "{err}");

    // The text encoder takes the plain file first, the variant file when that is all there is.
    let te_both = set(&["model.safetensors", "model.fp16.safetensors"]);
    let te_fp16 = set(&["model.fp16.safetensors"]);
    assert_eq!(
        weights::choose_weights("text_encoder", &te_both, "model", Some("fp16"), VariantPolicy::PlainFirst).unwrap(),
        WeightChoice::Single("model.safetensors".into())
    );
    assert_eq!(
        weights::choose_weights("text_encoder", &te_fp16, "model", Some("fp16"), VariantPolicy::PlainFirst).unwrap(),
        WeightChoice::Single("model.fp16.safetensors".into())
    );

    // A whole folder with a variant.
    let dir = tempfile::tempdir().unwrap();
    fake_model(
        dir.path(),
        &[
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.fp16.safetensors",
        ],
    );
    let files = locate_model_files(dir.path(), Some("fp16")).unwrap();
    assert_eq!(files.unet.weights, vec![dir.path().join("unet/diffusion_pytorch_model.fp16.safetensors")]);
    assert_eq!(files.vae.weights, vec![dir.path().join("vae/diffusion_pytorch_model.fp16.safetensors")]);
    assert_eq!(files.text_encoder.weights, vec![dir.path().join("text_encoder/model.fp16.safetensors")]);
    let err = format!("{:#}", locate_model_files(dir.path(), None).unwrap_err());
    assert!(err.contains("only variant weights") && err.contains("variant = \"fp16\""), "{err}");
}

#[test]
fn sharded_weights_are_found_through_the_index_and_load_from_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    fake_model(dir.path(), &["vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]);
    let unet = dir.path().join("unet");
    write_safetensors(&unet.join("diffusion_pytorch_model-00001-of-00002.safetensors"), &[spec("block.weight", &[3, 4])], Dtype::F32);
    write_safetensors(&unet.join("diffusion_pytorch_model-00002-of-00002.safetensors"), &[spec("block.bias", &[3])], Dtype::F32);
    let index = r#"{"metadata": {"total_size": 60}, "weight_map": {
        "block.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "block.bias": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#;
    std::fs::write(unet.join("diffusion_pytorch_model.safetensors.index.json"), index).unwrap();

    let files = locate_model_files(dir.path(), None).unwrap();
    assert_eq!(files.unet.weight_index, Some(unet.join("diffusion_pytorch_model.safetensors.index.json")));
    let mut shards = files.unet.weights.clone();
    shards.sort();
    assert_eq!(
        shards,
        vec![
            unet.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
            unet.join("diffusion_pytorch_model-00002-of-00002.safetensors")
        ]
    );
    let weights = files.unet.open_weights("unet", &WeightOptions::default()).unwrap();
    let (w, b) = weights.build(DType::F32, &Device::Cpu, build_block).unwrap();
    // Values written are exact in f32: tolerance 0 (exact equality).
    assert_eq!(w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), spec("", &[3, 4]).values);
    assert_eq!(b.to_vec1::<f32>().unwrap(), spec("", &[3]).values);

    // The fp16 index spelling is found for the variant.
    std::fs::rename(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        unet.join("diffusion_pytorch_model.safetensors.index.fp16.json"),
    )
    .unwrap();
    for c in ["vae/diffusion_pytorch_model", "text_encoder/model"] {
        std::fs::rename(dir.path().join(format!("{c}.safetensors")), dir.path().join(format!("{c}.fp16.safetensors"))).unwrap();
    }
    let files = locate_model_files(dir.path(), Some("fp16")).unwrap();
    assert_eq!(files.unet.weights.len(), 2);

    // A shard the index names but the folder lacks is reported by name.
    std::fs::remove_file(unet.join("diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let err = format!("{:#}", locate_model_files(dir.path(), Some("fp16")).unwrap_err());
    assert!(err.contains("unet/diffusion_pytorch_model-00002-of-00002.safetensors"), "{err}");

    // An index that escapes the folder is refused.
    let listing = set(&["scheduler/scheduler_config.json", "unet/diffusion_pytorch_model.safetensors.index.json"]);
    let err = plan_model_files(&listing, None, &mut |_| Ok(r#"{"weight_map": {"a": "../../etc/passwd"}}"#.to_string()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a file name inside the folder"), "{err}");
}

#[test]
fn pickle_only_weights_are_refused_with_the_reason_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    fake_model(dir.path(), &["vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]);
    std::fs::write(dir.path().join("unet/diffusion_pytorch_model.bin"), b"\x80\x02pickle").unwrap();
    let err = format!("{:#}", locate_model_files(dir.path(), None).unwrap_err());
    assert!(err.contains("unet/") && err.contains("diffusion_pytorch_model.bin"), "{err}");
    assert!(err.contains("arbitrary code"), "says why: {err}");
    assert!(err.contains("safe_serialization=True") && err.contains("Convert"), "says what to do: {err}");

    let ckpt = set(&["model.ckpt"]);
    let err = weights::choose_weights("text_encoder", &ckpt, "model", None, VariantPolicy::PlainFirst).unwrap_err().to_string();
    assert!(err.contains("pickle") && err.contains("model.ckpt"), "{err}");
}

#[test]
fn incomplete_folders_list_everything_missing() {
    let dir = tempfile::tempdir().unwrap();
    fake_model(dir.path(), &["unet/diffusion_pytorch_model.safetensors"]);
    std::fs::remove_file(dir.path().join("scheduler/scheduler_config.json")).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer/merges.txt")).unwrap();
    std::fs::remove_dir_all(dir.path().join("vae")).unwrap();
    let err = format!("{:#}", locate_model_files(dir.path(), None).unwrap_err());
    for missing in ["scheduler/scheduler_config.json", "tokenizer/merges.txt", "vae/", "text_encoder/"] {
        assert!(err.contains(missing), "{missing} not reported: {err}");
    }
}

#[test]
fn sdxl_pipelines_need_both_second_parts() {
    let dir = tempfile::tempdir().unwrap();
    fake_model(dir.path(), &["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]);
    assert!(locate_model_files(dir.path(), None).unwrap().text_encoder_2.is_none());
    // An SDXL index whose second encoder and tokenizer are not there: both are named as missing.
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}"#,
    )
    .unwrap();
    let err = format!("{:#}", locate_model_files(dir.path(), None).unwrap_err());
    assert!(err.contains("text_encoder_2/config.json") && err.contains("tokenizer_2/vocab.json"), "{err}");
    // One without the other is refused by name.
    std::fs::write(dir.path().join("model_index.json"), r#"{"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}"#).unwrap();
    let err = format!("{:#}", locate_model_files(dir.path(), None).unwrap_err());
    assert!(err.contains("StableDiffusionXLPipeline") && err.contains("text_encoder_2") && err.contains("tokenizer_2"), "{err}");
}

#[test]
fn missing_extra_and_misshaped_weights_name_the_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");

    write_safetensors(&path, &[spec("block.weight", &[3, 4])], Dtype::F32);
    let w = ComponentWeights::open("unet", &[path.clone()], &WeightOptions::default()).unwrap();
    let err = format!("{:#}", w.build(DType::F32, &Device::Cpu, build_block).err().unwrap());
    assert!(err.contains("`block.bias`") && err.contains("missing") && err.contains("[3]"), "{err}");

    write_safetensors(&path, &[spec("block.weight", &[4, 3]), spec("block.bias", &[3])], Dtype::F32);
    let w = ComponentWeights::open("unet", &[path.clone()], &WeightOptions::default()).unwrap();
    let err = format!("{:#}", w.build(DType::F32, &Device::Cpu, build_block).err().unwrap());
    assert!(err.contains("`block.weight`") && err.contains("[4, 3]") && err.contains("[3, 4]"), "{err}");
    assert!(err.contains("w.safetensors"), "names the file: {err}");

    write_safetensors(
        &path,
        &[
            spec("block.weight", &[3, 4]),
            spec("block.bias", &[3]),
            spec("block.stray", &[2, 2]),
            spec("text_model.embeddings.position_ids", &[1, 77]),
        ],
        Dtype::F32,
    );
    let w = ComponentWeights::open("unet", &[path.clone()], &WeightOptions::default()).unwrap();
    let err = format!("{:#}", w.build(DType::F32, &Device::Cpu, build_block).err().unwrap());
    assert!(err.contains("`block.stray` [2, 2]") && err.contains("not used"), "{err}");
    assert!(!err.contains("position_ids"), "buffers are not reported as extra: {err}");
    assert_eq!(w.unread(), vec!["block.stray".to_string()]);

    let w = ComponentWeights::open("unet", &[path], &WeightOptions::default()).unwrap();
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    assert!(vb.contains_tensor("block.stray"));
    assert!(!vb.contains_tensor("block.nothing"));
}

#[test]
fn fp16_files_load_into_f32_models() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.safetensors");
    // Values k/4 - 1 are exact in f16, so the f32 result must equal them exactly (tolerance 0).
    write_safetensors(&path, &[spec("block.weight", &[3, 4]), spec("block.bias", &[3])], Dtype::F16);
    let w = ComponentWeights::open("vae", &[path], &WeightOptions::default()).unwrap();
    let (weight, bias) = w.build(DType::F32, &Device::Cpu, build_block).unwrap();
    assert_eq!(weight.dtype(), DType::F32);
    assert_eq!(weight.flatten_all().unwrap().to_vec1::<f32>().unwrap(), spec("", &[3, 4]).values);
    assert_eq!(bias.to_vec1::<f32>().unwrap(), spec("", &[3]).values);
}

#[test]
fn old_vae_attention_names_and_conv_shaped_projections_load() {
    assert_eq!(weights::modern_attention_name("encoder.mid_block.attentions.0.query.weight"), "encoder.mid_block.attentions.0.to_q.weight");
    assert_eq!(weights::modern_attention_name("decoder.mid_block.attentions.0.proj_attn.bias"), "decoder.mid_block.attentions.0.to_out.0.bias");
    assert_eq!(weights::modern_attention_name("encoder.down_blocks.0.resnets.0.conv1.weight"), "encoder.down_blocks.0.resnets.0.conv1.weight");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vae.safetensors");
    let prefix = "encoder.mid_block.attentions.0";
    let names: Vec<String> = ["query", "key", "value", "proj_attn"].iter().map(|m| format!("{prefix}.{m}.weight")).collect();
    let biases: Vec<String> = ["query", "key", "value", "proj_attn"].iter().map(|m| format!("{prefix}.{m}.bias")).collect();
    let mut specs: Vec<Spec> = names.iter().map(|n| spec(n, &[4, 4, 1, 1])).collect();
    specs.extend(biases.iter().map(|n| spec(n, &[4])));
    specs.push(spec("encoder.mid_block.attentions.0.group_norm.weight", &[4]));
    write_safetensors(&path, &specs, Dtype::F32);

    let legacy = WeightOptions { legacy_attention_names: true, ..Default::default() };
    let w = ComponentWeights::open("vae", &[path.clone()], &legacy).unwrap();
    let read_all = |vb: candle_nn::VarBuilder| -> candle_core::Result<Vec<Tensor>> {
        let vb = vb.pp(prefix);
        let mut out = Vec::new();
        for m in ["to_q", "to_k", "to_v", "to_out.0"] {
            out.push(vb.pp(m).get((4, 4), "weight")?);
            out.push(vb.pp(m).get(4, "bias")?);
        }
        out.push(vb.pp("group_norm").get(4, "weight")?);
        Ok(out)
    };
    let tensors = w.build(DType::F32, &Device::Cpu, read_all).unwrap();
    assert_eq!(tensors[0].dims(), &[4, 4], "1x1 conv weight reshaped to a linear weight");
    // Reshaping keeps the values: exact equality (tolerance 0).
    assert_eq!(tensors[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(), spec("", &[4, 4]).values);

    // Without the legacy option the new names are missing.
    let w = ComponentWeights::open("vae", &[path], &WeightOptions::default()).unwrap();
    let err = format!("{:#}", w.build(DType::F32, &Device::Cpu, read_all).err().unwrap());
    assert!(err.contains("to_q.weight") && err.contains("missing"), "{err}");

    // Both spellings at once is ambiguous.
    let both = dir.path().join("both.safetensors");
    write_safetensors(&both, &[spec(&names[0], &[4, 4, 1, 1]), spec("encoder.mid_block.attentions.0.to_q.weight", &[4, 4])], Dtype::F32);
    let err = ComponentWeights::open("vae", &[both], &legacy).err().unwrap().to_string();
    assert!(err.contains("stored twice"), "{err}");
}

#[test]
fn damaged_safetensors_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    write_safetensors(&good, &[spec("block.weight", &[3, 4]), spec("block.bias", &[3])], Dtype::F32);
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    let mut cases: HashMap<&str, Vec<u8>> = HashMap::new();
    cases.insert("empty", vec![]);
    cases.insert("truncated data", bytes[..bytes.len() - 7].to_vec());
    cases.insert("truncated header", bytes[..8 + header_len / 2].to_vec());
    let mut lying = bytes.clone();
    lying[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    cases.insert("header length far too large", lying);
    let mut longer = bytes.clone();
    longer[..8].copy_from_slice(&((bytes.len() as u64) + 100).to_le_bytes());
    cases.insert("header length past the end", longer);
    let mut garbage = bytes.clone();
    for b in &mut garbage[8..8 + header_len] {
        *b = b'#';
    }
    cases.insert("header not JSON", garbage);

    // Headers that lie about the tensors: offsets past the data, and a shape that does not fit
    // the byte range.
    let forged = |header: &str, data_len: usize| {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data_len));
        out
    };
    cases.insert("offsets past the data", forged(r#"{"a":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}"#, 16));
    cases.insert("shape larger than its bytes", forged(r#"{"a":{"dtype":"F32","shape":[8],"data_offsets":[0,16]}}"#, 16));
    for (case, content) in cases {
        let path = dir.path().join(format!("{}.safetensors", case.replace(' ', "_")));
        std::fs::write(&path, content).unwrap();
        let result = ComponentWeights::open("unet", &[path.clone()], &WeightOptions::default());
        let err = result.err().unwrap_or_else(|| panic!("{case}: a damaged file must be refused")).to_string();
        assert!(err.contains("not a valid safetensors file"), "{case}: {err}");
        assert!(err.contains(&path.display().to_string()), "{case}: the error names the file: {err}");
    }

    let missing = dir.path().join("absent.safetensors");
    let err = ComponentWeights::open("unet", &[missing], &WeightOptions::default()).err().unwrap().to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
    let err = ComponentWeights::open("unet", &[dir.path().join("x.bin")], &WeightOptions::default()).err().unwrap().to_string();
    assert!(err.contains("only safetensors"), "{err}");
}

#[test]
fn text_encoder_names_load_with_or_without_the_text_model_prefix() {
    // transformers 5 saved the fixture without `text_model.`; SD 1.5 hub files carry it.
    let options = WeightOptions { optional_prefix: Some("text_model.".into()), ..Default::default() };
    let fixture = fixtures().join("tiny-sd/text_encoder/model.safetensors");
    let w = ComponentWeights::open("text_encoder", &[fixture], &options).unwrap();
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    assert!(vb.contains_tensor("text_model.final_layer_norm.weight"));
    assert_eq!(vb.get(32, "text_model.final_layer_norm.weight").unwrap().dims(), &[32]);
    assert_eq!(vb.get(32, "final_layer_norm.weight").unwrap().dims(), &[32]);
    assert!(!w.unread().contains(&"final_layer_norm.weight".to_string()));
    let err = vb.get(33, "text_model.final_layer_norm.weight").unwrap_err().to_string();
    assert!(err.contains("[32]") && err.contains("[33]"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefixed.safetensors");
    write_safetensors(&path, &[spec("text_model.block.weight", &[3, 4]), spec("text_model.block.bias", &[3])], Dtype::F32);
    let w = ComponentWeights::open("text_encoder", &[path.clone()], &options).unwrap();
    w.build(DType::F32, &Device::Cpu, build_block).expect("unprefixed requests find prefixed weights");
    let w = ComponentWeights::open("text_encoder", &[path], &WeightOptions::default()).unwrap();
    assert!(w.build(DType::F32, &Device::Cpu, build_block).is_err(), "without the option the names must match exactly");
}
