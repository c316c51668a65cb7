//! The networks follow their `config.json`: SD 2.x shapes build and run, linear projections
//! and per-block head counts are honoured, and unsupported settings are rejected by name.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lora::models::config::{ClipTextConfig, UNetConfig, VaeConfig};
use lora::models::UNet2DConditionModel;

/// Relative tolerance for f32 CPU parity: max |ours − reference| ≤ 1e-4 · max |reference|.
const REL_TOL: f32 = 1e-4;

fn fixture(rel: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures").join(rel)
}

fn tiny_unet_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny-sd/unet/config.json")).unwrap()).unwrap()
}

fn unet_config(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> anyhow::Result<UNetConfig> {
    let mut json = tiny_unet_json();
    edit(json.as_object_mut().unwrap());
    UNetConfig::from_json_str(&json.to_string())
}

fn rel_diff(ours: &Tensor, reference: &Tensor) -> f32 {
    let diff = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// An SD 2.x-shaped UNet (linear projections, per-block head counts, upcast attention, two
/// transformer layers in one block, a different cross-attention width) with random weights
/// builds and maps `[B, 4, H, W]` to `[B, 4, H, W]`, including a size that is not a multiple
/// of the UNet's downsampling factor.
#[test]
fn sd2_shaped_unet_builds_and_runs() {
    let cfg = unet_config(|c| {
        c.insert("use_linear_projection".into(), true.into());
        c.insert("attention_head_dim".into(), serde_json::json!([2, 4, 4, 4]));
        c.insert("transformer_layers_per_block".into(), serde_json::json!([1, 2, 1, 1]));
        c.insert("upcast_attention".into(), true.into());
        c.insert("cross_attention_dim".into(), 48.into());
        c.insert("layers_per_block".into(), 2.into());
    })
    .unwrap();
    assert_eq!(cfg.num_attention_heads, vec![2, 4, 4, 4]);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let mut unet = UNet2DConditionModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).unwrap();
    for var in varmap.all_vars() {
        let noise = Tensor::randn(0f32, 0.2, var.shape(), &dev).unwrap();
        var.set(&noise).unwrap();
    }
    let heads: Vec<usize> = unet.down_blocks.iter().filter_map(|b| b.attentions.first()).map(|a| a.transformer_blocks[0].attn1.heads()).collect();
    assert_eq!(heads, vec![2, 4, 4], "heads per cross-attention down block");
    assert_eq!(unet.down_blocks[1].attentions[0].transformer_blocks.len(), 2);
    let names: Vec<String> = unet.linears_mut().into_iter().map(|l| l.name.clone()).collect();
    assert!(names.contains(&"down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k".to_string()));
    assert!(names.contains(&"up_blocks.1.attentions.2.proj_in".to_string()));

    for (h, w) in [(16, 16), (12, 20)] {
        let sample = Tensor::randn(0f32, 1.0, (2, 4, h, w), &dev).unwrap();
        let context = Tensor::randn(0f32, 1.0, (2, 77, 48), &dev).unwrap();
        let out = unet.forward(&sample, &Tensor::new(&[999i64, 1], &dev).unwrap(), &lora::models::Conditioning::context((context).clone())).unwrap();
        assert_eq!(out.dims(), &[2, 4, h, w]);
        let wrong = Tensor::zeros((2, 77, 32), DType::F32, &dev).unwrap();
        let err = unet.forward(&sample, &Tensor::new(&[999i64, 1], &dev).unwrap(), &lora::models::Conditioning::context((wrong).clone())).unwrap_err().to_string();
        assert!(err.contains("encoder_hidden_states") && err.contains("48") && err.contains("32"), "{err}");
        let max = out.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max.is_finite() && max > 0.0, "output max |x| = {max}");
    }
}

/// `use_linear_projection` changes only how `proj_in`/`proj_out` are stored: the fixture's 1x1
/// conv weights flattened to linear weights give diffusers' output again.
#[test]
fn linear_projection_path_equals_conv_projection() {
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors"), &dev).unwrap();
    for (name, tensor) in tensors.iter_mut() {
        if (name.contains(".proj_in.") || name.contains(".proj_out.")) && name.ends_with("weight") {
            let (o, i, _, _) = tensor.dims4().unwrap();
            *tensor = tensor.reshape((o, i)).unwrap();
        }
    }
    let cfg = unet_config(|c| {
        c.insert("use_linear_projection".into(), true.into());
        c.insert("attention_head_dim".into(), serde_json::json!([8, 8, 8, 8]));
    })
    .unwrap();
    let unet = UNet2DConditionModel::load(VarBuilder::from_tensors(tensors, DType::F32, &dev), &cfg).unwrap();
    let g = candle_core::safetensors::load(fixture("golden/unet.safetensors"), &dev).unwrap();
    let out = unet.forward(&g["sample"], &g["timesteps"], &lora::models::Conditioning::context((g["encoder_hidden_states"]).clone())).unwrap();
    let rel = rel_diff(&out, &g["out"]);
    assert!(rel <= REL_TOL, "linear-projection UNet vs golden: relative diff {rel:e} exceeds {REL_TOL:e}");
}

/// The head count is not ignored: 4 heads instead of 8 in the first block changes the output.
#[test]
fn head_count_changes_the_network() {
    let dev = Device::Cpu;
    let cfg = unet_config(|c| {
        c.insert("attention_head_dim".into(), serde_json::json!([4, 8, 8, 8]));
    })
    .unwrap();
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors")], DType::F32, &dev) }.unwrap();
    let unet = UNet2DConditionModel::load(vb, &cfg).unwrap();
    let g = candle_core::safetensors::load(fixture("golden/unet.safetensors"), &dev).unwrap();
    let out = unet.forward(&g["sample"], &g["timesteps"], &lora::models::Conditioning::context((g["encoder_hidden_states"]).clone())).unwrap();
    assert!(rel_diff(&out, &g["out"]) > 1e-3, "4 heads should not reproduce the 8-head output");
}

#[test]
fn unsupported_unet_fields_are_rejected_by_name() {
    let cases: Vec<(&str, serde_json::Value)> = vec![
        ("class_embed_type", "timestep".into()),
        ("addition_embed_type", "text_time".into()),
        ("time_cond_proj_dim", 256.into()),
        ("resnet_time_scale_shift", "scale_shift".into()),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn".into()),
        ("encoder_hid_dim", 1024.into()),
        ("time_embedding_type", "fourier".into()),
        ("act_fn", "mish".into()),
    ];
    for (field, value) in cases {
        let err = unet_config(|c| {
            c.insert(field.into(), value.clone());
        })
        .expect_err(field);
        let msg = format!("{err:#}");
        assert!(msg.contains(field) && msg.contains(&value.to_string().trim_matches('"').to_string()), "{field}: message {msg:?}");
    }
    let err = unet_config(|c| {
        c.insert("down_block_types".into(), serde_json::json!(["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]));
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("SimpleCrossAttnDownBlock2D"), "{err:#}");
    let err = unet_config(|c| {
        c.insert("attention_head_dim".into(), serde_json::json!([8, 8]));
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("attention_head_dim"), "{err:#}");
}

#[test]
fn harmless_unknown_keys_are_accepted_and_defaults_apply() {
    let cfg = UNetConfig::from_json_str(r#"{"_class_name": "UNet2DConditionModel", "sample_size": 64, "some_future_key": 1}"#).unwrap();
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(cfg.num_attention_heads, vec![8; 4]);
    assert_eq!(cfg.layers_per_block, vec![2; 4]);
    assert_eq!(cfg.cross_attention_dim, vec![1280; 4]);
    assert_eq!(cfg.time_embed_dim, 1280);
}

#[test]
fn vae_and_clip_configs_parse_and_reject() {
    let vae = VaeConfig::from_json_file(fixture("tiny-sd/vae/config.json")).unwrap();
    assert_eq!((vae.block_out_channels.clone(), vae.latent_channels, vae.scaling_factor), (vec![32, 32, 64, 64], 4, 0.18215));
    let err = VaeConfig::from_json_str(r#"{"down_block_types": ["DownEncoderBlock2DX"], "up_block_types": ["UpDecoderBlock2D"]}"#).unwrap_err();
    assert!(format!("{err:#}").contains("DownEncoderBlock2DX"), "{err:#}");

    let clip = ClipTextConfig::from_json_file(fixture("tiny-sd/text_encoder/config.json")).unwrap();
    assert_eq!((clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads), (32, 3, 4));
    let err = ClipTextConfig::from_json_str(r#"{"hidden_act": "relu2"}"#).unwrap_err();
    assert!(format!("{err:#}").contains("hidden_act") && format!("{err:#}").contains("relu2"), "{err:#}");
    let err = UNetConfig::from_json_file(fixture("tiny-sd/nope.json")).unwrap_err();
    assert!(format!("{err:#}").contains("nope.json"), "{err:#}");
}

/// A weight of the wrong shape is an error naming the tensor and both shapes.
#[test]
fn wrong_weight_shape_names_tensor_and_shapes() {
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors"), &dev).unwrap();
    let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    tensors.insert(name.into(), Tensor::zeros((32, 33), DType::F32, &dev).unwrap());
    let cfg = unet_config(|_| {}).unwrap();
    let err = match UNet2DConditionModel::load(VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev), &cfg) {
        Ok(_) => panic!("loading a mis-shaped weight succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(name) && err.contains("33") && err.contains("32"), "{err}");
    tensors.remove(name);
    let err = match UNet2DConditionModel::load(VarBuilder::from_tensors(tensors, DType::F32, &dev), &cfg) {
        Ok(_) => panic!("loading without a weight succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(name), "{err}");
}

/// Less common settings build and run with random weights: `only_cross_attention`, no mid
/// block, `center_input_sample`, `time_embedding_act_fn`, `resnet_skip_time_act`,
/// `num_attention_heads`, `layers_per_block` per block, a 1x1 `conv_in`.
#[test]
fn optional_unet_features_build_and_run() {
    let cfg = unet_config(|c| {
        c.insert("only_cross_attention".into(), serde_json::json!([true, false, false, false]));
        c.insert("mid_block_type".into(), serde_json::Value::Null);
        c.insert("center_input_sample".into(), true.into());
        c.insert("time_embedding_act_fn".into(), "silu".into());
        c.insert("resnet_skip_time_act".into(), true.into());
        c.insert("num_attention_heads".into(), serde_json::json!([4, 4, 8, 8]));
        c.insert("layers_per_block".into(), serde_json::json!([1, 2, 1, 2]));
        c.insert("conv_in_kernel".into(), 1.into());
    })
    .unwrap();
    assert_eq!(cfg.num_attention_heads, vec![4, 4, 8, 8]);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let unet = UNet2DConditionModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).unwrap();
    for var in varmap.all_vars() {
        var.set(&Tensor::randn(0f32, 0.2, var.shape(), &dev).unwrap()).unwrap();
    }
    assert!(unet.mid_block.is_none());
    // only_cross_attention: attn1 reads the 32-wide text context.
    assert_eq!(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.in_features(), 32);
    assert_eq!(unet.down_blocks[1].resnets.len(), 2);
    assert_eq!(unet.up_blocks[0].resnets.len(), 3);
    let sample = Tensor::randn(0f32, 1.0, (1, 4, 16, 16), &dev).unwrap();
    let context = Tensor::randn(0f32, 1.0, (1, 77, 32), &dev).unwrap();
    let out = unet.forward(&sample, &Tensor::new(500f32, &dev).unwrap(), &lora::models::Conditioning::context((context).clone())).unwrap();
    assert_eq!(out.dims(), &[1, 4, 16, 16]);
    let max = out.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max.is_finite() && max > 0.0, "output max |x| = {max}");
}

/// SD repositories name the text encoder's weights `text_model.…`; transformers 5 may save them
/// without the prefix (as the fixture does). Both load to the same network and LoRA names.
#[test]
fn clip_weights_with_or_without_text_model_prefix() {
    let dev = Device::Cpu;
    let cfg = ClipTextConfig::from_json_file(fixture("tiny-sd/text_encoder/config.json")).unwrap();
    let plain: HashMap<String, Tensor> = candle_core::safetensors::load(fixture("tiny-sd/text_encoder/model.safetensors"), &dev).unwrap();
    let prefixed: HashMap<String, Tensor> = plain.iter().map(|(k, v)| (format!("text_model.{k}"), v.clone())).collect();
    let ids = Tensor::new(&[[49406u32, 320, 1000, 49407, 49407]], &dev).unwrap();
    let mut outs = Vec::new();
    for tensors in [plain, prefixed] {
        let mut clip = lora::models::ClipTextModel::load(VarBuilder::from_tensors(tensors, DType::F32, &dev), &cfg).unwrap();
        assert_eq!(clip.linears_mut()[0].name, "text_model.encoder.layers.0.self_attn.q_proj");
        assert_eq!(clip.linears_mut().len(), 3 * 6);
        outs.push(clip.forward(&ids).unwrap());
    }
    assert_eq!(rel_diff(&outs[0], &outs[1]), 0.0);
    let bad = Tensor::new(&[[49408u32]], &dev).unwrap();
    let clip = lora::models::ClipTextModel::load(
        VarBuilder::from_tensors(candle_core::safetensors::load(fixture("tiny-sd/text_encoder/model.safetensors"), &dev).unwrap(), DType::F32, &dev),
        &cfg,
    )
    .unwrap();
    let err = clip.forward(&bad).unwrap_err().to_string();
    assert!(err.contains("49408"), "{err}");
}
