//! Timing of the tiny UNet's forward and forward+backward with LoRA on the attention
//! projections (ignored by default: `cargo test --test tests models_bench -- --ignored --nocapture`).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use lora::models::config::UNetConfig;
use lora::models::UNet2DConditionModel;
use lora::nn::LoraBranch;

fn fixture(rel: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures").join(rel)
}

#[test]
#[ignore]
fn bench_tiny_unet_forward_and_backward() {
    let dev = Device::Cpu;
    let cfg = UNetConfig::from_json_file(fixture("tiny-sd/unet/config.json")).unwrap();
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors")], DType::F32, &dev) }.unwrap();
    let mut unet = UNet2DConditionModel::load(vb, &cfg).unwrap();
    let mut vars = Vec::new();
    for linear in unet.linears_mut().into_iter().filter(|l| ["to_q", "to_k", "to_v", "to_out.0"].iter().any(|t| l.name.ends_with(&format!(".{t}")))) {
        let down = Var::randn(0f32, 0.25, (4, linear.in_features()), &dev).unwrap();
        let up = Var::zeros((linear.out_features(), 4), DType::F32, &dev).unwrap();
        linear.loras.push(LoraBranch::new(down.as_tensor().clone(), up.as_tensor().clone(), 1.0));
        vars.push((down, up));
    }
    for size in [8usize, 32] {
        let sample = Tensor::randn(0f32, 1.0, (2, 4, size, size), &dev).unwrap();
        let t = Tensor::new(&[10i64, 731], &dev).unwrap();
        let ctx = Tensor::randn(0f32, 1.0, (2, 77, 32), &dev).unwrap();
        let runs = 5;
        let start = Instant::now();
        for _ in 0..runs {
            unet.forward(&sample, &t, &lora::models::Conditioning::context((ctx).clone())).unwrap();
        }
        let fwd = start.elapsed().as_secs_f64() / runs as f64;
        let start = Instant::now();
        for _ in 0..runs {
            let loss = unet.forward(&sample, &t, &lora::models::Conditioning::context((ctx).clone())).unwrap().sqr().unwrap().mean_all().unwrap();
            loss.backward().unwrap();
        }
        let both = start.elapsed().as_secs_f64() / runs as f64;
        eprintln!("latents {size}x{size}, batch 2: forward {:.1} ms, forward+backward {:.1} ms", fwd * 1e3, both * 1e3);
    }
}

#[test]
#[ignore]
fn bench_pieces() {
    use lora::nn::attention::{softmax_last_dim, softmax_last_dim_composed};
    use lora::nn::scaled_dot_product_attention;
    let dev = Device::Cpu;
    let time = |what: &str, f: &dyn Fn()| {
        f();
        let start = Instant::now();
        for _ in 0..3 {
            f();
        }
        eprintln!("{what}: {:.1} ms", start.elapsed().as_secs_f64() / 3.0 * 1e3);
    };
    let q = Tensor::randn(0f32, 1.0, (2, 1024, 32), &dev).unwrap();
    time("sdpa 2x1024x32 8 heads", &|| {
        scaled_dot_product_attention(&q, &q, &q, 8, None, false).unwrap();
    });
    let s = Tensor::randn(0f32, 1.0, (16, 1024, 1024), &dev).unwrap();
    time("softmax 16x1024x1024", &|| {
        softmax_last_dim(&s).unwrap();
    });
    time("softmax composed 16x1024x1024", &|| {
        softmax_last_dim_composed(&s).unwrap();
    });
    time("softmax fused again", &|| {
        softmax_last_dim(&s).unwrap();
    });
    time("exp 16M", &|| {
        s.exp().unwrap();
    });
    time("max_keepdim 16M", &|| {
        s.max_keepdim(2).unwrap();
    });
    let m = s.max_keepdim(2).unwrap();
    time("broadcast_sub 16M", &|| {
        s.broadcast_sub(&m).unwrap();
    });
    let qh = Tensor::randn(0f32, 1.0, (16, 1024, 4), &dev).unwrap();
    time("matmul qk^T 16x1024x4", &|| {
        qh.matmul(&qh.t().unwrap()).unwrap();
    });
    time("matmul pv", &|| {
        s.matmul(&qh).unwrap();
    });
    let x = Tensor::randn(0f32, 1.0, (2, 64, 32, 32), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (64, 64, 3, 3), &dev).unwrap();
    time("conv3x3 2x64x32x32", &|| {
        x.conv2d(&w, 1, 1, 1, 1).unwrap();
    });
}
