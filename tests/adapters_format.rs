//! LoRA files against the reference goldens: the diffusers and kohya files read to the same
//! modules and tensors, our diffusers writer reproduces the reference file, kohya/PEFT/old
//! attention-processor forms, lossless round trips, clear errors on damaged input, and
//! applying a file to layers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use lora::adapters::keys::kohya_to_module;
use lora::adapters::weights::LoraFormat;
use lora::adapters::kohya_meta::{training_metadata, TrainingInfo, PIPELINE_SHA256_KEY, PIPELINE_TOML_KEY};
use lora::adapters::read::{parse_lora_bytes, read_lora_file};
use lora::adapters::weights::{Component, LoraModule, LoraWeights};
use lora::adapters::write::{serialize_lora, write_lora_file};
use lora::adapters::lora::apply_lora_weights;
use lora::nn::AdaptedLinear;
use safetensors::{Dtype, SafeTensors};

fn golden(name: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures/golden").join(name)
}
fn diffusers_golden() -> PathBuf {
    golden("lora-diffusers/pytorch_lora_weights.safetensors")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Same modules, same tensors bit for bit, same scale.
fn assert_same_lora(a: &LoraWeights, b: &LoraWeights) {
    for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
        let (ma, mb) = (a.component(c), b.component(c));
        assert_eq!(ma.keys().collect::<Vec<_>>(), mb.keys().collect::<Vec<_>>(), "{c:?} module names");
        for (name, x) in ma {
            let y = &mb[name];
            // Exact: file conversion must not change a single bit (tolerance 0).
            assert_eq!(max_abs_diff(&x.down, &y.down), 0.0, "{name} down differs");
            assert_eq!(max_abs_diff(&x.up, &y.up), 0.0, "{name} up differs");
            assert_eq!(x.scale(), y.scale(), "{name} scale differs");
        }
    }
}

#[test]
fn diffusers_and_kohya_goldens_read_to_the_same_lora() {
    let d = read_lora_file(&diffusers_golden()).unwrap();
    let k = read_lora_file(&golden("lora-kohya.safetensors")).unwrap();
    assert_eq!(d.source_format, Some(LoraFormat::Diffusers));
    assert_eq!(k.source_format, Some(LoraFormat::Kohya));
    // Tiny UNet: 10 transformer blocks x 2 attentions x 4 projections.
    assert_eq!(d.unet.len(), 80);
    assert!(d.text_encoder.is_empty());
    assert!(d.unet.contains_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"));
    assert!(d.unet.contains_key("up_blocks.3.attentions.1.transformer_blocks.0.attn2.to_k"));
    for m in d.unet.values() {
        assert_eq!(m.rank(), 4);
        assert_eq!(m.alpha, None, "the reference writes no alpha");
        assert_eq!(m.scale(), 1.0);
    }
    for m in k.unet.values() {
        assert_eq!(m.alpha, Some(4.0), "kohya alpha read from the int64 scalar");
    }
    assert_same_lora(&d, &k);
    assert_eq!(d.metadata, BTreeMap::from([("format".to_string(), "pt".to_string())]));
}

#[test]
fn writing_the_diffusers_golden_reproduces_the_reference_file() {
    let bytes = std::fs::read(diffusers_golden()).unwrap();
    let d = parse_lora_bytes(&bytes).unwrap();
    let ours = serialize_lora(&d, LoraFormat::Diffusers).unwrap();
    let (_, ref_header) = SafeTensors::read_metadata(&bytes).unwrap();
    let (_, our_header) = SafeTensors::read_metadata(&ours).unwrap();
    assert_eq!(our_header.metadata(), ref_header.metadata(), "header metadata must be exactly {{\"format\": \"pt\"}}");
    let (r, o) = (SafeTensors::deserialize(&bytes).unwrap(), SafeTensors::deserialize(&ours).unwrap());
    let mut rn = r.names();
    let mut on = o.names();
    rn.sort();
    on.sort();
    assert_eq!(rn, on, "same key set");
    for name in rn {
        let (a, b) = (r.tensor(name).unwrap(), o.tensor(name).unwrap());
        assert_eq!(b.dtype(), Dtype::F32, "{name}");
        assert_eq!(a.dtype(), b.dtype(), "{name}");
        assert_eq!(a.shape(), b.shape(), "{name}");
        assert_eq!(a.data(), b.data(), "{name}: bytes differ");
    }
    // The Python writer is the same safetensors library: the whole file is identical.
    assert_eq!(ours, bytes, "our diffusers file is byte-identical to the reference's");
}

#[test]
fn writing_kohya_matches_the_kohya_golden() {
    let d = read_lora_file(&diffusers_golden()).unwrap();
    let ours = serialize_lora(&d, LoraFormat::Kohya).unwrap();
    let gold = std::fs::read(golden("lora-kohya.safetensors")).unwrap();
    let (r, o) = (SafeTensors::deserialize(&gold).unwrap(), SafeTensors::deserialize(&ours).unwrap());
    let mut rn = r.names();
    let mut on = o.names();
    rn.sort();
    on.sort();
    assert_eq!(rn, on, "same kohya key set");
    for name in rn {
        let (a, b) = (r.tensor(name).unwrap(), o.tensor(name).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        assert_eq!(a.data(), b.data(), "{name}: bytes differ");
    }
}

/// A LoRA with mixed ranks, alphas and a text encoder, built in memory.
fn synthetic() -> LoraWeights {
    let dev = Device::Cpu;
    let module = |r: usize, i: usize, o: usize, alpha: Option<f64>| {
        LoraModule::new(Tensor::randn(0f32, 1.0, (r, i), &dev).unwrap(), Tensor::randn(0f32, 1.0, (o, r), &dev).unwrap(), alpha)
    };
    let mut w = LoraWeights::default();
    w.unet.insert("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into(), module(4, 32, 32, Some(4.0)));
    w.unet.insert("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k".into(), module(8, 48, 32, Some(2.0)));
    w.unet.insert("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0".into(), module(4, 32, 32, Some(1.5)));
    w.unet.insert("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj".into(), module(2, 32, 256, None));
    w.text_encoder.insert("text_model.encoder.layers.0.self_attn.q_proj".into(), module(4, 32, 32, Some(8.0)));
    w.text_encoder.insert("text_model.encoder.layers.1.mlp.fc1".into(), module(4, 32, 37, None));
    w
}

#[test]
fn round_trips_are_lossless() {
    let w = synthetic();
    for first in [LoraFormat::Diffusers, LoraFormat::Kohya, LoraFormat::Peft] {
        for second in [LoraFormat::Diffusers, LoraFormat::Kohya, LoraFormat::Peft] {
            let a = parse_lora_bytes(&serialize_lora(&w, first).unwrap()).unwrap();
            assert_eq!(a.source_format, Some(first));
            assert_same_lora(&w, &a);
            let b = parse_lora_bytes(&serialize_lora(&a, second).unwrap()).unwrap();
            assert_same_lora(&w, &b);
        }
    }
}

#[test]
fn diffusers_header_gets_adapter_metadata_only_when_alpha_differs_from_rank() {
    let w = synthetic();
    let bytes = serialize_lora(&w, LoraFormat::Diffusers).unwrap();
    let (_, h) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = h.metadata().clone().unwrap();
    assert_eq!(meta["format"], "pt");
    let json: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
    assert_eq!(json["unet.r"], 4);
    assert!(json["text_encoder.lora_alpha"].is_number());
    let names = SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(String::from).collect::<Vec<_>>();
    assert!(names.contains(&"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight".to_string()));
    assert!(names.contains(&"unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.lora.up.weight".to_string()));
}

/// Re-key the diffusers golden with `f` and serialise it (F32 tensors, given header).
fn rekeyed(f: impl Fn(&str) -> String, extra: &[(&str, Tensor)]) -> Vec<u8> {
    let bytes = std::fs::read(diffusers_golden()).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for name in st.names() {
        let v = st.tensor(name).unwrap();
        let t = Tensor::from_raw_buffer(v.data(), DType::F32, v.shape(), &Device::Cpu).unwrap();
        map.insert(f(name), t);
    }
    for (k, t) in extra {
        map.insert(k.to_string(), t.clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    candle_core::safetensors::save(&map, &p).unwrap();
    std::fs::read(p).unwrap()
}

#[test]
fn peft_and_attention_processor_forms_read_to_the_same_lora() {
    let d = read_lora_file(&diffusers_golden()).unwrap();
    let peft_default = rekeyed(|k| k.replace(".lora.down.weight", ".lora_A.default.weight").replace(".lora.up.weight", ".lora_B.default.weight"), &[]);
    let p = parse_lora_bytes(&peft_default).unwrap();
    assert_eq!(p.source_format, Some(LoraFormat::Peft));
    assert_same_lora(&d, &p);
    let peft_saved = rekeyed(|k| format!("base_model.model.{}", k.strip_prefix("unet.").unwrap().replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight")), &[]);
    assert_same_lora(&d, &parse_lora_bytes(&peft_saved).unwrap());
    let processor = rekeyed(
        |k| {
            let (module, half) = k.rsplit_once(".lora.").unwrap();
            let (half, _) = half.split_once('.').unwrap();
            let (attn, proj) = module.split_once(".to_").unwrap();
            let proj = proj.trim_end_matches(".0");
            format!("{attn}.processor.to_{proj}_lora.{half}.weight")
        },
        &[],
    );
    let a = parse_lora_bytes(&processor).unwrap();
    assert_eq!(a.source_format, Some(LoraFormat::AttnProcessor));
    assert_same_lora(&d, &a);
}

#[test]
fn text_encoder_forms_read() {
    let t = |r, i| Tensor::ones((r, i), DType::F32, &Device::Cpu).unwrap();
    let mut map = HashMap::new();
    map.insert("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight".to_string(), t(2, 32));
    map.insert("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight".to_string(), t(32, 2));
    map.insert("text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight".to_string(), t(2, 32));
    map.insert("text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight".to_string(), t(32, 2));
    map.insert("text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight".to_string(), t(2, 32));
    map.insert("text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight".to_string(), t(37, 2));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("te.safetensors");
    candle_core::safetensors::save(&map, &p).unwrap();
    let w = read_lora_file(&p).unwrap();
    let names: Vec<&String> = w.text_encoder.keys().collect();
    assert_eq!(
        names,
        vec![
            "text_model.encoder.layers.0.self_attn.out_proj",
            "text_model.encoder.layers.0.self_attn.q_proj",
            "text_model.encoder.layers.1.mlp.fc1"
        ]
    );
    // Keys from transformers 5's flattened CLIPTextModel (no `text_model.`) get the same names.
    let mut flat = HashMap::new();
    flat.insert("text_encoder.encoder.layers.1.mlp.fc1.lora_A.weight".to_string(), t(2, 32));
    flat.insert("text_encoder.encoder.layers.1.mlp.fc1.lora_B.weight".to_string(), t(37, 2));
    let p2 = dir.path().join("flat.safetensors");
    candle_core::safetensors::save(&flat, &p2).unwrap();
    let f = read_lora_file(&p2).unwrap();
    assert_eq!(f.text_encoder.keys().collect::<Vec<_>>(), vec!["text_model.encoder.layers.1.mlp.fc1"]);
    // kohya text-encoder names come back as module names.
    let k = parse_lora_bytes(&serialize_lora(&w, LoraFormat::Kohya).unwrap()).unwrap();
    assert_same_lora(&w, &k);
}

#[test]
fn kohya_names_map_back_to_module_names() {
    let cases = [
        ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"),
        ("mid_block_attentions_0_proj_in", "mid_block.attentions.0.proj_in"),
        ("down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("down_blocks_1_resnets_0_conv_shortcut", "down_blocks.1.resnets.0.conv_shortcut"),
        ("up_blocks_0_resnets_2_time_emb_proj", "up_blocks.0.resnets.2.time_emb_proj"),
        ("text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"),
        ("text_model_encoder_layers_0_mlp_fc2", "text_model.encoder.layers.0.mlp.fc2"),
    ];
    for (kohya, module) in cases {
        assert_eq!(kohya_to_module(kohya), module);
    }
}

fn err_of(bytes: &[u8]) -> String {
    format!("{:#}", parse_lora_bytes(bytes).unwrap_err())
}

#[test]
fn damaged_or_lying_files_are_clear_errors() {
    let good = std::fs::read(diffusers_golden()).unwrap();
    // Truncated data: the header promises more bytes than there are.
    let e = err_of(&good[..good.len() - 10]);
    assert!(e.contains("truncated") && e.contains("offset"), "{e}");
    // Header length larger than the file.
    let mut lying = good.clone();
    lying[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = err_of(&lying);
    assert!(e.contains("header"), "{e}");
    // Shorter than the length prefix.
    assert!(err_of(&good[..5]).contains("8-byte"));
    // Garbage JSON.
    let mut garbage = 4u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"{{{{");
    assert!(err_of(&garbage).contains("header"));
    // A file error names the path.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.safetensors");
    std::fs::write(&p, &good[..100]).unwrap();
    let e = format!("{:#}", read_lora_file(&p).unwrap_err());
    assert!(e.contains("cut.safetensors"), "{e}");
    // Pickles are refused with a reason.
    let e = format!("{:#}", read_lora_file(&dir.path().join("x.bin")).unwrap_err());
    assert!(e.contains("pickle"), "{e}");
}

#[test]
fn keys_we_do_not_understand_and_mismatched_halves_are_errors_naming_the_key() {
    let t = |r: usize, i: usize| Tensor::ones((r, i), DType::F32, &Device::Cpu).unwrap();
    let e = err_of(&rekeyed(|k| k.to_string(), &[("unet.foo.bar.weight", t(2, 2))]));
    assert!(e.contains("unet.foo.bar.weight"), "{e}");
    let e = err_of(&rekeyed(|k| k.to_string(), &[("model.diffusion.weight", t(2, 2))]));
    assert!(e.contains("model.diffusion.weight"), "{e}");
    // An up weight whose rank disagrees with its down weight.
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight";
    let e = err_of(&rekeyed(|k| k.to_string(), &[(key, t(32, 3))]));
    assert!(e.contains("to_q") && e.contains("[32, 3]") && e.contains("[4, 32]"), "{e}");
    // A down weight with no up weight.
    let e = err_of(&rekeyed(|k| k.to_string(), &[("unet.extra.to_q.lora.down.weight", t(4, 32))]));
    assert!(e.contains("extra.to_q") && e.contains("no up weight"), "{e}");
    // A 3-d tensor.
    let t3 = Tensor::ones((1, 4, 32), DType::F32, &Device::Cpu).unwrap();
    let e = err_of(&rekeyed(|k| k.to_string(), &[("unet.extra.to_k.lora.down.weight", t3)]));
    assert!(e.contains("unet.extra.to_k.lora.down.weight"), "{e}");
}

#[test]
fn kohya_header_carries_training_metadata_and_pipeline_hash() {
    let mut w = read_lora_file(&diffusers_golden()).unwrap();
    let info = TrainingInfo {
        base_model_version: "sd_v1".into(),
        model_name: "tiny-sd".into(),
        rank: 4,
        alpha: 4.0,
        learning_rate: 1e-4,
        max_train_steps: 10,
        pipeline_toml: "[model]\nsource = \"tiny-sd\"\n".into(),
        ..Default::default()
    };
    w.metadata = training_metadata(&info);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out/kohya.safetensors");
    write_lora_file(&w, &p, LoraFormat::Kohya).unwrap();
    let back = read_lora_file(&p).unwrap();
    assert_eq!(back.metadata["ss_network_module"], "networks.lora");
    assert_eq!(back.metadata["ss_network_dim"], "4");
    assert_eq!(back.metadata["ss_network_alpha"], "4");
    assert_eq!(back.metadata["ss_base_model_version"], "sd_v1");
    // The caption tricks as kohya names them (off by default).
    assert_eq!(
        (back.metadata["ss_caption_dropout_rate"].as_str(), back.metadata["ss_shuffle_caption"].as_str(), back.metadata["ss_keep_tokens"].as_str()),
        ("0", "false", "0")
    );
    assert_eq!(back.metadata[PIPELINE_TOML_KEY], info.pipeline_toml);
    // sha256 of the TOML text, computed independently with `sha256sum` on this string.
    assert_eq!(back.metadata[PIPELINE_SHA256_KEY], "09ad56df743557b1488321e3aed09e0f0f142a86d6ac7c964c20a53733ac31f9");
    assert_same_lora(&w, &back);
    // Diffusers form ignores training metadata: the header stays exactly {"format": "pt"}.
    let d = serialize_lora(&back, LoraFormat::Diffusers).unwrap();
    let (_, h) = SafeTensors::read_metadata(&d).unwrap();
    assert_eq!(h.metadata().clone().unwrap(), HashMap::from([("format".to_string(), "pt".to_string())]));
}

/// Layers named and shaped like the modules of `w`, with random frozen weights.
fn layers_for(w: &BTreeMap<String, LoraModule>) -> Vec<AdaptedLinear> {
    w.iter()
        .map(|(n, m)| {
            let (o, i) = (m.up.dims()[0], m.down.dims()[1]);
            AdaptedLinear::new(n.clone(), Tensor::randn(0f32, 0.1, (o, i), &Device::Cpu).unwrap(), None)
        })
        .collect()
}

#[test]
fn applying_a_file_adds_scale_times_up_down() {
    let k = read_lora_file(&golden("lora-kohya.safetensors")).unwrap();
    let mut unet = layers_for(&k.unet);
    let before: Vec<AdaptedLinear> = unet.clone();
    apply_lora_weights(&k, unet.iter_mut().collect(), vec![], 0.75).unwrap();
    for (lin, base) in unet.iter().zip(&before) {
        assert_eq!(lin.loras.len(), 1);
        let m = &k.unet[&lin.name];
        let x = Tensor::randn(0f32, 1.0, (2, lin.in_features()), &Device::Cpu).unwrap();
        // Independent computation: W + 0.75 · (alpha/r = 1) · B A.
        let merged = (&base.weight + (m.up.matmul(&m.down).unwrap() * 0.75).unwrap()).unwrap();
        let want = x.matmul(&merged.t().unwrap()).unwrap();
        let diff = max_abs_diff(&lin.forward(&x).unwrap(), &want);
        assert!(diff < 1e-5, "{}: max diff {diff} > 1e-5 (f32 tolerance)", lin.name);
    }
}

#[test]
fn applying_a_mismatched_file_attaches_nothing_and_names_key_and_shapes() {
    let d = read_lora_file(&diffusers_golden()).unwrap();
    let mut unet = layers_for(&d.unet);
    // One layer of the wrong width.
    let bad = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
    let idx = unet.iter().position(|l| l.name == bad).unwrap();
    unet[idx] = AdaptedLinear::new(bad, Tensor::zeros((32, 40), DType::F32, &Device::Cpu).unwrap(), None);
    // One layer missing.
    let missing = "mid_block.attentions.0.transformer_blocks.0.attn1.to_v";
    unet.retain(|l| l.name != missing);
    let e = format!("{:#}", apply_lora_weights(&d, unet.iter_mut().collect(), vec![], 1.0).unwrap_err());
    assert!(e.contains(bad) && e.contains("[4, 32]") && e.contains("[32, 40]"), "{e}");
    assert!(e.contains(missing) && e.contains("near names"), "{e}");
    assert!(e.contains(&format!("unet.{missing}.lora.down.weight")), "the file key is named: {e}");
    assert!(unet.iter().all(|l| l.loras.is_empty()), "nothing attached after an error");
    // A text-encoder LoRA with no text-encoder layers is an error too.
    let mut te_only = LoraWeights::default();
    te_only.text_encoder = d.unet.clone().into_iter().take(1).map(|(_, m)| ("text_model.encoder.layers.0.self_attn.q_proj".to_string(), m)).collect();
    assert!(apply_lora_weights(&te_only, vec![], vec![], 1.0).is_err());
}

#[test]
fn several_files_stack_each_with_its_own_scale() {
    let d = read_lora_file(&diffusers_golden()).unwrap();
    let k = read_lora_file(&golden("lora-kohya.safetensors")).unwrap();
    let mut unet = layers_for(&d.unet);
    apply_lora_weights(&d, unet.iter_mut().collect(), vec![], 0.5).unwrap();
    apply_lora_weights(&k, unet.iter_mut().collect(), vec![], 0.25).unwrap();
    assert!(unet.iter().all(|l| l.loras.len() == 2));
    assert_eq!(unet[0].loras[0].scale, 0.5);
    assert_eq!(unet[0].loras[1].scale, 0.25);
}

/// Rebuild a file with a hand-edited JSON header around the original data.
fn with_header(edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
    let good = std::fs::read(diffusers_golden()).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&good[8..8 + n]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&good[8 + n..]);
    out
}

#[test]
fn lying_tensor_entries_are_errors_naming_the_tensor() {
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight";
    // Offsets that do not match the shape.
    let e = err_of(&with_header(|h| {
        let end = h[key]["data_offsets"][1].as_u64().unwrap();
        h.get_mut(key).unwrap()["data_offsets"][1] = (end + 4).into();
    }));
    assert!(e.contains(key) && e.contains("data offsets"), "{e}");
    // A shape that does not match the byte count.
    let e = err_of(&with_header(|h| h.get_mut(key).unwrap()["shape"] = serde_json::json!([4, 33])));
    assert!(e.contains(key) && e.contains("[4, 33]"), "{e}");
    // A dtype a LoRA weight cannot have.
    let e = err_of(&with_header(|h| h.get_mut(key).unwrap()["dtype"] = "I32".into()));
    assert!(e.contains(key), "{e}");
}

#[test]
fn corrupted_bytes_never_panic() {
    // Deterministic corruption of the header and the first data bytes: every outcome must be
    // an Ok or an Err, never a panic.
    let good = std::fs::read(golden("lora-kohya.safetensors")).unwrap();
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for _ in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % 4096.min(bytes.len() as u64)) as usize;
            bytes[at] = next() as u8;
        }
        let result = std::panic::catch_unwind(|| parse_lora_bytes(&bytes).map(|_| ()));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(_)) => errors += 1,
            Err(_) => panic!("parse_lora_bytes panicked on corrupted input"),
        }
    }
    assert!(errors > 0, "some corruptions must be detected");
}
